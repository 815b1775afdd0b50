"""``contrastive-jax plan --config FILE[:ARG] --devices N [--device-memory 80GiB] [--fit] [--json]``.

Compiles the config's real train step (the one ``contrastive-jax train`` runs) for a mesh of N
devices and prints the memory of ONE device: parameters, optimizer state, EMA, batch,
activations (+ gradients and update scratch), loss temporaries, and whether it fits the
``--device-memory`` budget after a stated headroom. On a CPU host the N devices are simulated
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), so a laptop can plan a GPU/TPU run;
the activation bytes are XLA's buffer assignment for the CPU backend, close to but not identical
with an accelerator's. ``--eval-shape`` replaces the full compile by compiles of 1- and 2-block
towers extrapolated in depth (faster for deep models; said in the output). ``--fit`` searches
micro-batch size, remat policy and loss block size and prints the overrides that fit.
"""
from __future__ import annotations

import json
import sys

from contrastive_jax.commands import EXIT_CONFIG_ERROR, load_config_or_none

HELP = "per-device memory of a config's train step on N devices, and the overrides that make it fit"


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally PATH:ARG")
    parser.add_argument("--devices", default="1", help="mesh size N (simulated CPU devices on a CPU host)")
    parser.add_argument("--device-memory", default=None, help="memory of one device, e.g. 80GiB, 16GB")
    parser.add_argument("--headroom", type=float, default=0.10,
                        help="fraction of --device-memory kept free for the runtime (default 0.10)")
    parser.add_argument("--fit", action="store_true", help="search overrides that fit --device-memory")
    parser.add_argument("--eval-shape", action="store_true",
                        help="estimate temporaries from 1-/2-block towers instead of compiling the full step")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _error(msg: str) -> int:
    print(f"contrastive-jax plan: {msg}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


def run(args, overrides) -> int:
    # Arguments are checked before jax starts: the simulated device count is fixed at startup.
    try:
        devices = int(args.devices)
    except ValueError:
        return _error(f"--devices {args.devices!r} is not an integer >= 1")
    if devices < 1:
        return _error(f"--devices {devices} must be >= 1")
    from contrastive_jax.train.plan import DEFAULT_HEADROOM, format_bytes, parse_bytes, simulate_cpu_devices

    budget = None
    if args.device_memory is not None:
        try:
            budget = parse_bytes(args.device_memory)
        except ValueError as e:
            return _error(str(e))
    if args.fit and budget is None:
        return _error("--fit needs --device-memory")
    if not 0.0 <= args.headroom < 1.0:
        return _error(f"--headroom {args.headroom} must be in [0, 1)")
    try:
        simulate_cpu_devices(devices)
    except RuntimeError as e:
        return _error(str(e))
    config = load_config_or_none(args.config, overrides)
    if config is None:
        return EXIT_CONFIG_ERROR
    from contrastive_jax.train.plan import fit_config, plan_memory

    method = "extrapolate" if args.eval_shape else "compile"
    headroom = args.headroom if args.headroom is not None else DEFAULT_HEADROOM
    result = {"config": args.config, "devices": devices, "budget": budget, "headroom": headroom}
    if args.fit:
        fit = fit_config(config, devices, budget, headroom=headroom, method=method)
        plan = fit.plan if fit.plan is not None else plan_memory(config, devices, method=method)
        result.update(fit_overrides=fit.override_args() if fit.overrides is not None else None, tried=fit.tried)
    else:
        plan = plan_memory(config, devices, method=method)
    result["plan"] = plan.to_dict()
    result["fits"] = plan.fits(budget, headroom) if budget else None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if result["fits"] is not False else 1
    print(f"{args.config} on {devices} device(s): global batch {plan.batch_size}, {plan.per_device_batch} per device "
          f"(method: {'full step compiled' if plan.method == 'compile' else 'eval-shape + depth extrapolation'})")
    print(f"{'per device':<28}{'bytes':>14}")
    for key, label in (("params", "parameters"), ("optimizer", "optimizer state"), ("ema", "EMA params"),
                       ("other_state", "step/rng counters"), ("batch", "input batch"),
                       ("activations", "activations+grads+scratch"), ("loss", "loss temporaries"),
                       ("outputs", "outputs (metrics)")):
        print(f"{label:<28}{format_bytes(getattr(plan, key)):>14}")
    print(f"{'total':<28}{format_bytes(plan.total):>14}")
    if plan.compiled:
        print(f"(XLA memory_analysis peak: {format_bytes(plan.compiled['peak'])})")
    if budget:
        usable = budget * (1 - headroom)
        verdict = "FITS" if result["fits"] else "DOES NOT FIT"
        print(f"{verdict} in {format_bytes(budget)} per device ({headroom:.0%} headroom: "
              f"{format_bytes(usable)} usable, {plan.total / usable:.0%} used)")
    if args.fit:
        if result["fit_overrides"] is None:
            print(f"no override tried ({len(result['tried'])}) fits; use more devices or an fsdp mesh axis")
        elif result["fit_overrides"]:
            print("overrides that fit: " + " ".join(result["fit_overrides"]))
        else:
            print("fits as configured; no overrides needed")
    return 0 if result["fits"] is not False else 1
