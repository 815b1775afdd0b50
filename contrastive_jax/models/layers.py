"""Building blocks shared by the towers: dense layers, attention, pre-norm transformer encoder,
multihead attention pooling.

Every parameter is created through ``nn.with_logical_partitioning`` so that sharding rules can map
logical axis names to mesh axes (``contrastive_jax.parallel.logical``). Parameter axis names:

- ``embed``: a tower's residual width.
- ``mlp``: the hidden dimension of a transformer MLP.
- ``heads`` / ``kv``: attention heads and per-head feature dimension.
- ``joint``: the shared embedding dimension of the projection heads.
- ``layers``: the stacked-layer axis of a scanned encoder (``scan=True``).
- ``vocab``, ``length``, ``patch_height``, ``patch_width``, ``channels``, ``conv_in``,
  ``conv_out``: see the towers.

Activations are constrained with ``nn.with_logical_constraint`` under their own names (so that
e.g. FSDP can shard the ``embed`` dim of weights without sharding that dim of activations):
``batch``, ``act_length``, ``act_embed``, ``act_mlp``, ``act_heads``, ``act_kv``. Outside an
``nn.logical_axis_rules`` context with a mesh set these constraints are no-ops.

Parameters are always float32; ``dtype`` is the compute dtype (activations and matmul inputs).
LayerNorm statistics and attention logits/softmax are computed in float32 regardless (bf16 is too
coarse for them).

Attention (``attention_impl``, see :data:`ATTENTION_IMPLS` and :func:`resolve_attention_impl`):
``'einsum'`` is the hand-written reference (two einsums and a float32 softmax); ``'xla'`` and
``'cudnn'`` call :func:`jax.nn.dot_product_attention` (XLA's fused pattern, or cuDNN's flash
attention kernel on NVIDIA GPUs); ``'auto'`` picks cuDNN where it supports the call and XLA
elsewhere. All of them compute the same function (tested in tests/models/test_attention_impl.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Large negative logit for masked attention entries. Finite (not -inf) so that a row whose keys
# are all masked yields a uniform softmax instead of NaN.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)

# Activation names -> functions. 'gelu' is the tanh approximation (cheaper than erf on CPU and the
# default of big_vision); 'gelu_exact' is the erf form of PyTorch's nn.GELU; 'quick_gelu' is
# x * sigmoid(1.702 x), the approximation OpenAI CLIP was trained with (Radford et al. 2021) — a
# checkpoint must be run with the activation it was trained with.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=True),
    "gelu_exact": functools.partial(nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
}

# Attention implementations (the ``attention_impl`` field of the towers): see the module docstring.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum")
# Compute dtypes cuDNN's flash attention takes (float32 it does not).
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# remat policy names -> jax.checkpoint policies (None = save nothing, recompute the whole block).
REMAT_POLICIES = ("none", "full", "dots_saveable")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def resolve_attention_impl(impl: str, dtype: Dtype, head_dim: int, platform: str | None = None) -> str:
    """The implementation ``impl`` runs as: ``'einsum'`` | ``'xla'`` | ``'cudnn'``.

    ``'auto'`` is ``'cudnn'`` when the default backend (or ``platform``) is a GPU, the compute
    ``dtype`` is bfloat16/float16 and ``head_dim`` is a multiple of 8 up to 128 (what cuDNN's
    flash attention supports on every GPU generation), else ``'xla'`` (CPU, TPU, float32).
    Explicit ``'cudnn'`` is checked the same way, so an unsupported choice fails at trace time
    with a message naming the field instead of deep inside cuDNN.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}; known: {', '.join(ATTENTION_IMPLS)}")
    if impl in ("einsum", "xla"):
        return impl
    platform = platform or jax.default_backend()
    problems = []
    if platform not in ("gpu", "cuda"):
        problems.append(f"it needs an NVIDIA GPU (backend is {platform!r})")
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
        problems.append(f"it needs model.dtype bfloat16 or float16 (compute dtype is {jnp.dtype(dtype).name})")
    if head_dim % 8 or head_dim > 128:
        problems.append(f"it needs a head dim that is a multiple of 8 up to 128 (got {head_dim})")
    if impl == "auto":
        return "xla" if problems else "cudnn"
    if problems:
        raise ValueError(f"attention_impl='cudnn' is not possible here: {'; '.join(problems)}; "
                         "use 'auto' or 'xla'")
    return "cudnn"


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (no-op without rules and a mesh)."""
    return nn.with_logical_constraint(x, tuple(names))


def fan_in_init(num_in_dims: int, ndim: int):
    """Truncated-normal fan-in init for a kernel whose first ``num_in_dims`` dims are inputs.

    Flax's default ``lecun_normal`` assumes a 2-D kernel (in_axis=-2); for multi-dim kernels such
    as ``[embed, heads, kv]`` that would take ``heads`` as the fan-in, so the axes are explicit.
    """
    return nn.initializers.variance_scaling(
        1.0,
        "fan_in",
        "truncated_normal",
        in_axis=tuple(range(num_in_dims)),
        out_axis=tuple(range(num_in_dims, ndim)),
    )


class DenseGeneral(nn.Module):
    """``y = x · kernel + bias`` contracting the last ``num_in_dims`` dims of ``x``.

    Shapes: x ``[..., *in_dims]`` -> y ``[..., *features]`` in ``dtype``; kernel
    ``[*in_dims, *features]`` float32 with logical names ``kernel_axes``; bias ``[*features]``
    with ``bias_axes`` (``None``: no bias).
    """

    features: Sequence[int]
    kernel_axes: Sequence[str]
    bias_axes: Sequence[str] | None = None
    num_in_dims: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        in_shape = tuple(x.shape[x.ndim - self.num_in_dims :])
        shape = in_shape + features
        if len(self.kernel_axes) != len(shape):
            raise ValueError(f"kernel_axes {self.kernel_axes} do not match kernel shape {shape}")
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(fan_in_init(len(in_shape), len(shape)), tuple(self.kernel_axes)),
            shape,
            jnp.float32,
        )
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.num_in_dims)
        if self.bias_axes is not None:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.bias_axes)),
                features,
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, statistics in float32, output cast to ``dtype``.

    Params ``scale``/``bias`` ``[embed]`` float32.
    """

    dtype: Dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (width,), jnp.float32
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (width,), jnp.float32
        )
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (self-attention, or cross-attention when ``kv`` is given).

    Args (call): x ``[B, Lq, W]`` queries; kv ``[B, Lk, W]`` keys/values (default: ``x``); mask
    bool broadcastable to ``[B, heads, Lq, Lk]`` (True = query may attend to key) or None; the
    towers pass a key-padding mask ``[B, 1, 1, Lk]``, the only form ``'cudnn'`` takes.
    Returns ``[B, Lq, W]`` in ``dtype``. Params: ``query``/``key``/``value`` kernels
    ``[W, heads, head_dim]`` + biases, ``out`` kernel ``[heads, head_dim, W]`` + bias.

    Attributes:
      num_heads: heads (divide ``W``).
      causal: query ``i`` attends only to keys ``j <= i`` (on top of ``mask``).
      attention_impl: ``'auto'`` | ``'xla'`` | ``'cudnn'`` | ``'einsum'`` (module docstring).
        With ``'cudnn'`` the key mask is passed as per-example key lengths, which is exact when
        the valid keys are a prefix of the sequence (padding at the end, as every tokenizer
        here writes it); an example with no valid key attends to its first key.
      dtype: compute dtype; logits and softmax are float32 in every implementation.

    A query row whose keys are all masked gets a uniform softmax (not NaN) in ``'einsum'`` and
    ``'xla'``: both mask with a finite large negative logit.
    """

    num_heads: int
    causal: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, kv: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        kv = x if kv is None else kv
        impl = resolve_attention_impl(self.attention_impl, self.dtype, head_dim)

        def heads_proj(name, inp):
            y = DenseGeneral(
                (self.num_heads, head_dim), ("embed", "heads", "kv"), ("heads", "kv"),
                dtype=self.dtype, name=name,
            )(inp)
            return constrain(y, ("batch", "act_length", "act_heads", "act_kv"))

        q, k, v = heads_proj("query", x), heads_proj("key", kv), heads_proj("value", kv)  # [B, L, H, Dh]
        if impl == "einsum":
            out = _einsum_attention(q, k, v, mask, self.causal, self.dtype)
        elif impl == "xla":
            # Same masking as the einsum path (a finite large negative logit where mask is False)
            # and the same scaling (q scaled in the compute dtype, the kernel's scale 1), so that
            # bf16 results round as the reference's do rather than differently.
            q = q * jnp.asarray(head_dim**-0.5, self.dtype)
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal, scale=1.0,
                                               implementation="xla")
        else:
            out = _cudnn_attention(q, k, v, mask, self.causal, head_dim)
        out = constrain(out.astype(self.dtype), ("batch", "act_length", "act_heads", "act_kv"))
        return DenseGeneral(
            (width,), ("heads", "kv", "embed"), ("embed",), num_in_dims=2, dtype=self.dtype,
            name="out",
        )(out)


def _einsum_attention(q, k, v, mask, causal: bool, dtype) -> jax.Array:
    """Reference attention: q/k/v ``[B, L, H, Dh]`` -> ``[B, Lq, H, Dh]`` in ``dtype``."""
    head_dim = q.shape[-1]
    q = q * jnp.asarray(head_dim**-0.5, dtype)
    # Logits and softmax in float32: bf16 logits lose the small differences softmax amplifies.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if causal:
        tril = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), dtype=bool))[None, None]
        mask = tril if mask is None else mask & tril
    if mask is not None:
        logits = jnp.where(mask, logits, _MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _cudnn_attention(q, k, v, mask, causal: bool, head_dim: int) -> jax.Array:
    """cuDNN flash attention; a key-padding mask ``[B, 1, 1, Lk]`` becomes key lengths ``[B]``.

    cuDNN would turn a dense mask into an additive bias (slower, and it needs even lengths in
    training), so only key-padding masks are taken, as lengths (see MultiHeadAttention).
    """
    lengths = None
    if mask is not None:
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            raise ValueError(f"attention_impl='cudnn' takes a key-padding mask [B, 1, 1, Lk], got {mask.shape}")
        mask = jnp.broadcast_to(mask, (k.shape[0], 1, 1, k.shape[1]))
        # At least one key, so that an all-padding example stays finite.
        lengths = jnp.maximum(jnp.sum(mask[:, 0, 0, :], axis=-1), 1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                        scale=head_dim**-0.5, implementation="cudnn")


class MlpBlock(nn.Module):
    """``Dense(mlp_dim) -> act -> Dense(width)``; x ``[..., W]`` -> ``[..., W]``."""

    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = DenseGeneral((self.mlp_dim,), ("embed", "mlp"), ("mlp",), dtype=self.dtype, name="fc1")(x)
        if h.ndim == 3:
            h = constrain(h, ("batch", "act_length", "act_mlp"))
        h = activation(self.act)(h)
        return DenseGeneral((width,), ("mlp", "embed"), ("embed",), dtype=self.dtype, name="fc2")(h)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))`` then ``x + MLP(LN(x))``.

    ``causal`` / ``attention_impl``: as :class:`MultiHeadAttention`'s.
    """

    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-6
    causal: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = constrain(x, ("batch", "act_length", "act_embed"))
        h = LayerNorm(dtype=self.dtype, epsilon=self.norm_eps, name="norm_attn")(x)
        x = x + MultiHeadAttention(self.num_heads, self.causal, self.attention_impl, dtype=self.dtype,
                                   name="attn")(h, mask)
        h = LayerNorm(dtype=self.dtype, epsilon=self.norm_eps, name="norm_mlp")(x)
        x = x + MlpBlock(self.mlp_dim, self.act, dtype=self.dtype, name="mlp")(h)
        return constrain(x, ("batch", "act_length", "act_embed"))


class _ScanBlock(nn.Module):
    """EncoderBlock in the ``(carry, x) -> (carry, y)`` form ``nn.scan`` needs."""

    num_heads: int
    mlp_dim: int
    act: str
    dtype: Dtype
    remat: str
    norm_eps: float = 1e-6
    causal: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask):
        block = _maybe_remat(EncoderBlock, self.remat, scanned=True)
        return block(self.num_heads, self.mlp_dim, self.act, dtype=self.dtype, norm_eps=self.norm_eps,
                     causal=self.causal, attention_impl=self.attention_impl, name="block")(x, mask), None


def _maybe_remat(cls, policy: str, scanned: bool = False):
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; known: {', '.join(REMAT_POLICIES)}")
    if policy == "none":
        return cls
    # Inside scan the loop boundary already stops XLA from CSE-ing the recomputation away, so
    # prevent_cse (which adds optimisation barriers) is only needed unscanned.
    return nn.remat(
        cls,
        policy=None if policy == "full" else jax.checkpoint_policies.dots_saveable,
        prevent_cse=not scanned,
    )


class Encoder(nn.Module):
    """``depth`` pre-norm blocks followed by a final LayerNorm (``norm``).

    x ``[B, L, W]`` -> ``[B, L, W]`` in ``dtype``.

    Param layout: unscanned, blocks are ``block_0 ... block_{depth-1}``; with ``scan=True`` one
    ``blocks/block`` subtree whose every leaf has a leading ``[depth]`` axis (logical name
    ``layers``), compiled once instead of ``depth`` times. ``remat`` ('none' | 'full' |
    'dots_saveable') recomputes each block's activations in the backward pass instead of storing
    them ('dots_saveable' keeps matmul outputs, recomputes the cheap elementwise work).
    ``norm_eps``: every LayerNorm's epsilon (1e-6 as big_vision; PyTorch/OpenAI CLIP use 1e-5).
    ``mask``: key-padding mask ``[B, 1, 1, L]`` bool or None; ``causal``: causal self-attention;
    ``attention_impl``: see :class:`MultiHeadAttention`.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    remat: str = "none"
    scan: bool = False
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-6
    causal: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        if self.scan and self.depth > 0:
            scanned = nn.scan(
                _ScanBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(self.num_heads, self.mlp_dim, self.act, self.dtype, self.remat, self.norm_eps,
                           self.causal, self.attention_impl, name="blocks")(x, mask)
        else:
            block = _maybe_remat(EncoderBlock, self.remat)
            for i in range(self.depth):
                x = block(self.num_heads, self.mlp_dim, self.act, dtype=self.dtype, norm_eps=self.norm_eps,
                          causal=self.causal, attention_impl=self.attention_impl, name=f"block_{i}")(x, mask)
        return LayerNorm(dtype=self.dtype, epsilon=self.norm_eps, name="norm")(x)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned query attends over the tokens, then a residual MLP.

    Reference: Set Transformer's PMA (Lee et al. 2019), used as the ``map`` head of big_vision's
    ViT and SigLIP (Zhai et al. 2023). x ``[B, L, W]`` (mask ``[B, 1, 1, L]`` bool or None) ->
    ``[B, W]`` in ``dtype``. Params: ``probe [1, 1, W]``, ``attn/...``, ``norm/...``, ``mlp/...``.
    ``attention_impl``: see :class:`MultiHeadAttention`.
    """

    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-6
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, _, w = x.shape
        probe = self.param(
            "probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")),
            (1, 1, w), jnp.float32,
        )
        q = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, w))
        x = MultiHeadAttention(self.num_heads, attention_impl=self.attention_impl, dtype=self.dtype,
                               name="attn")(q, mask, kv=x)
        y = LayerNorm(dtype=self.dtype, epsilon=self.norm_eps, name="norm")(x)
        x = x + MlpBlock(self.mlp_dim, self.act, dtype=self.dtype, name="mlp")(y)
        return x[:, 0]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Float32 ``x / ||x||`` over the last dim; ``eps`` keeps a zero vector finite (stays zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
