"""Evaluation during (and after) training: sharded encoders plus the evaluators of ``config.eval``.

The training loop builds one :class:`EvalRunner` and calls ``runner(params)`` whenever it evaluates;
the runner owns everything evaluation needs (jitted encoders, the eval split, prompts), so the loop
does not know which evaluators exist.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import Mesh

from contrastive_jax import data as data_lib
from contrastive_jax.evaluate.two_tower import evaluate_two_tower
from contrastive_jax.parallel.mesh import batch_sharding, replicated_batch_to_global, to_host


def make_encoders(model, mesh: Mesh, batch_axes: Sequence[str], param_shardings: Any):
    """Jitted, sharded ``(params, batch) -> [B, D]`` image and text encoders."""
    in_sh = batch_sharding(mesh, batch_axes)
    enc_image = jax.jit(
        lambda p, x: model.apply({"params": p}, x, method="encode_image"),
        in_shardings=(param_shardings, in_sh),
        out_shardings=in_sh,
    )
    enc_text = jax.jit(
        lambda p, t: model.apply({"params": p}, t, method="encode_text"),
        in_shardings=(param_shardings, in_sh),
        out_shardings=in_sh,
    )
    return enc_image, enc_text


class EvalRunner:
    """``runner(params) -> {metric_name: float}`` on ``config.data.eval_split``.

    Args:
      config: the run config (reads ``data`` and ``eval``).
      model: the built model (``encode_image`` / ``encode_text`` methods).
      mesh, batch_axes: where the encoders run; the eval batch is split over ``batch_axes``.
      param_shardings: shardings of the params tree passed to ``__call__``.
      tokenizer: the run's tokenizer (prompts are tokenized exactly as training captions).
    """

    def __init__(self, config: Any, model, mesh: Mesh, batch_axes: Sequence[str], param_shardings: Any, tokenizer):
        self.config = config
        self.mesh = mesh
        self.batch_axes = tuple(batch_axes)
        self.tokenizer = tokenizer
        self.encoders = make_encoders(model, mesh, self.batch_axes, param_shardings)
        self.dataset_info = data_lib.dataset_info(config.data)
        self.eval_data = data_lib.load_eval_arrays(
            config.data, config.data.eval_split, tokenizer=tokenizer, max_examples=int(config.eval.max_examples)
        )

    def __call__(self, params: Any) -> dict:
        """Zero-shot per attribute and retrieval recalls; every process holds the eval split."""
        enc_image, enc_text = self.encoders

        def image_fn(x):
            return to_host(enc_image(params, replicated_batch_to_global(x, self.mesh, self.batch_axes)))

        def text_fn(t):
            return to_host(enc_text(params, replicated_batch_to_global(t, self.mesh, self.batch_axes)))

        info = self.dataset_info
        return evaluate_two_tower(
            image_fn,
            text_fn,
            self.eval_data,
            tokenizer=self.tokenizer,
            class_names=info["class_names"],
            templates=info["templates"],
            prompts=info["prompts"],
            batch_size=int(self.config.eval.batch_size),
            recall_ks=tuple(self.config.eval.recall_ks),
        )
