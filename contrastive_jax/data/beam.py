"""Apache Beam plumbing shared by ``data convert --runner beam`` and ``data repack``.

Beam is an optional extra (``pip install -e ".[beam]"``): nothing else in the library imports it,
and :func:`require_beam` turns its absence into a one-line :class:`ConversionError` naming the
extra. The default runner is Beam's DirectRunner with ``direct_num_workers`` local worker
processes (``direct_running_mode='multi_processing'``); any other runner (Dataflow, Flink, Spark)
is chosen through pipeline options, ``K=V`` pairs passed on as ``--K=V``
(``runner=DataflowRunner``, ``project=...``, ``region=...``, ``temp_location=gs://...``), see
docs/preprocessing.md.
"""
from __future__ import annotations

import logging
from typing import Sequence

from contrastive_jax.data.convert import ConversionError

DEFAULT_RUNNER = "DirectRunner"


def require_beam():
    """-> the ``apache_beam`` module. Raises ConversionError (one line, naming the extra) when it
    is not installed."""
    try:
        import apache_beam
    except ImportError as e:
        raise ConversionError(f"--runner beam needs Apache Beam, which is not installed ({e}); install the "
                              "extra: pip install -e \".[beam]\" (or pip install apache-beam)") from None
    return apache_beam


def pipeline_options(num_workers: int = 2, options: Sequence[str] = ()):
    """``PipelineOptions`` for ``num_workers`` local DirectRunner processes, updated by ``options``.

    Args:
      num_workers: DirectRunner worker processes (``direct_num_workers``; ignored by other runners).
      options: ``'K=V'`` strings, each passed to Beam as ``--K=V`` (a bare ``'K'`` as ``--K``, a
        flag); ``runner=...`` picks the runner (default DirectRunner).

    Raises:
      ConversionError: Beam missing, ``num_workers < 1`` or an option that is not ``K=V``.
    """
    require_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    if int(num_workers) < 1:
        raise ConversionError(f"--num-workers={num_workers} must be >= 1")
    # Beam's workers log every channel they open at INFO: warnings only, unless an option says otherwise.
    flags = [f"--runner={DEFAULT_RUNNER}", f"--direct_num_workers={int(num_workers)}",
             "--direct_running_mode=multi_processing", "--default_sdk_harness_log_level=WARNING"]
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    for option in options or ():
        key = str(option).split("=", 1)[0].strip().lstrip("-")
        if not key or not key.replace("_", "").replace("-", "").isalnum():
            raise ConversionError(f"--beam-option {option!r} is not K=V with K a Beam pipeline option name "
                                  "(e.g. runner=DataflowRunner, project=my-project, temp_location=gs://b/tmp)")
        value = str(option).split("=", 1)[1] if "=" in str(option) else None
        flags.append(f"--{key}" if value is None else f"--{key}={value}")
    # Later flags win: the user's runner / worker count replace the defaults above.
    return PipelineOptions(flags)


def runner_name(options) -> str:
    """The runner ``options`` select (``'DirectRunner'`` unless set)."""
    from apache_beam.options.pipeline_options import StandardOptions

    return options.view_as(StandardOptions).runner or DEFAULT_RUNNER
