"""``contrastive-jax data convert ...``, ``data repack ...`` and ``data train-tokenizer ...``.

    contrastive-jax data convert IMAGES_DIR --captions captions.csv --name my_data
    contrastive-jax data convert shards/ --format webdataset --name my_data
    contrastive-jax data convert class_tree/ --format classes --name my_classes
    contrastive-jax data convert IMAGES_DIR --captions captions.csv --name my_data --runner beam --num-workers 4
    contrastive-jax data repack --sources 'shards/{00000..00099}.tar' --output repacked/ --dedup --resize 256
    contrastive-jax data train-tokenizer --name my_data --vocab-size 8000 --output my_data.model
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys

from contrastive_jax.data.config import defaults as data_defaults

HELP = "convert user data to a TFDS dataset; repack shards; train a SentencePiece tokenizer on its captions"


def add_arguments(parser) -> None:
    default_dir = data_defaults().data_dir
    sub = parser.add_subparsers(dest="data_command", required=True)
    c = sub.add_parser("convert", help="images + captions (folder+CSV/JSONL, WebDataset tars, class "
                       "folders) -> TFDS array_record dataset")
    c.add_argument("source", help="image folder, .tar shard or folder of shards, or class-folder root")
    c.add_argument("--name", required=True, help="dataset name (then: --config.data.name=NAME)")
    c.add_argument("--format", default="folder", choices=("folder", "webdataset", "classes"))
    c.add_argument("--captions", help="folder format: CSV (image,caption) or JSONL file")
    c.add_argument("--data-dir", default=default_dir, help=f"where TFDS datasets live (default {default_dir})")
    c.add_argument("--test-fraction", type=float, default=0.05)
    c.add_argument("--validation-fraction", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=0, help="split assignment seed")
    c.add_argument("--version", default="1.0.0")
    c.add_argument("--class-template", default="a photo of a {}.", help="classes format: caption")
    c.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="fail if more than this fraction of records is bad")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset and validate every record again (clears the cache)")
    c.add_argument("--encoding", default=None,
                   help="text encoding of the captions file (default: detected: UTF-8, a byte-order "
                        "mark, else cp1252 / latin-1, reported as captions_encoding)")
    c.add_argument("--no-progress", action="store_true")
    _add_beam_arguments(c, "single_process")

    r = sub.add_parser("repack", help="streamed shards (webdataset/parquet/array_record, local or s3://, gs://) -> "
                       "filtered, deduplicated, resized shards (an Apache Beam pipeline by default)")
    r.add_argument("--sources", nargs="+", required=True, metavar="SPEC",
                   help="shard paths, globs or brace ranges (shards/shard-{00000..00099}.tar)")
    r.add_argument("--input-format", choices=("webdataset", "parquet", "array_record"), default=None,
                   help="default: from the file names")
    r.add_argument("--output", required=True, help="output folder (local, s3:// or gs://); must be new or empty")
    r.add_argument("--format", default="array_record", choices=("array_record", "webdataset"))
    r.add_argument("--name", default="repacked", help="array_record output: the TFDS dataset name in file names")
    r.add_argument("--resize", type=int, default=None, help="shorter side in px (larger images only)")
    r.add_argument("--reencode", default=None, metavar="jpeg:Q|png", help="re-encode every image")
    r.add_argument("--filter", action="append", default=[], metavar="EXPR",
                   help="keep records meeting '<field> <op> <number>' (repeatable; the config.data.sources grammar: "
                        "json.<key>, caption_chars, caption_words, image_bytes, aspect)")
    r.add_argument("--dedup", action="store_true", help="drop byte-identical images (SHA-256), keeping the first key")
    r.add_argument("--shard-size", type=int, default=10_000, help="records per output shard (on average)")
    r.add_argument("--overwrite", action="store_true", help="replace what a non-empty --output holds")
    _add_beam_arguments(r, "beam")

    t = sub.add_parser("train-tokenizer", help="train a SentencePiece model on a dataset's captions")
    t.add_argument("--name", required=True, help="dataset (config.data.name)")
    t.add_argument("--data-dir", default=default_dir)
    t.add_argument("--split", default="train")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"))
    t.add_argument("--no-lowercase", action="store_true", help="keep case (then also set "
                   "--config.data.tokenizer.lowercase=False when training)")
    t.add_argument("--clean", default="whitespace", choices=("none", "whitespace", "basic", "clip"))
    t.add_argument("--output", required=True, help="the .model file to write")


def _add_beam_arguments(parser, default_runner: str) -> None:
    parser.add_argument("--runner", default=default_runner, choices=("single_process", "beam"),
                        help="beam: an Apache Beam pipeline (needs the [beam] extra); default runner DirectRunner "
                             "with --num-workers local processes (see docs/preprocessing.md)")
    parser.add_argument("--num-workers", type=int, default=2, help="DirectRunner worker processes (default 2)")
    parser.add_argument("--beam-option", action="append", default=[], metavar="K=V",
                        help="a Beam pipeline option, passed as --K=V (repeatable), e.g. runner=DataflowRunner, "
                             "project=P, region=R, temp_location=gs://B/tmp; runner=FlinkRunner, flink_master=H:P")


@contextlib.contextmanager
def stdout_to_stderr():
    """Sends everything written to stdout meanwhile (TFDS's "Downloading and preparing ..." lines,
    libraries printing from C) to stderr, so that a command's stdout is its JSON result alone."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. a captured stream in tests
        fd = None
    saved = os.dup(fd) if fd is not None else None
    if saved is not None:
        os.dup2(sys.stderr.fileno(), fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, fd)
            os.close(saved)


def _convert(args) -> int:
    from contrastive_jax.data.convert import ConversionError, convert

    try:
        with stdout_to_stderr():
            report = convert(
                args.source, name=args.name, data_dir=args.data_dir, format=args.format,
                captions=args.captions, class_template=args.class_template,
                test_fraction=args.test_fraction, validation_fraction=args.validation_fraction,
                seed=args.seed, version=args.version, max_bad_fraction=args.max_bad_fraction,
                overwrite=args.overwrite, progress=not args.no_progress, encoding=args.encoding,
                runner=args.runner, num_workers=args.num_workers, beam_options=args.beam_option)
    except ConversionError as e:
        print(f"contrastive-jax data convert: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # A read-only or foreign --data-dir: the user's to fix, in one line.
        print(f"contrastive-jax data convert: cannot write {e.filename or args.data_dir} ({e.strerror}); "
              "choose another --data-dir", file=sys.stderr)
        return 2
    summary = {k: v for k, v in report.items() if k != "skipped"}
    summary["first_skipped"] = report["skipped"][:20]
    print(json.dumps(summary, indent=2), flush=True)
    print(f"train with: --config.data.name={args.name} --config.data.data_dir={args.data_dir}",
          file=sys.stderr)
    return 0


def _repack(args) -> int:
    from contrastive_jax.data.convert import ConversionError
    from contrastive_jax.data.repack import repack

    try:
        with stdout_to_stderr():
            report = repack(args.sources, args.output, format=args.format, input_format=args.input_format,
                            filters=args.filter, resize=args.resize, reencode=args.reencode, dedup=args.dedup,
                            shard_size=args.shard_size, name=args.name, runner=args.runner,
                            num_workers=args.num_workers, beam_options=args.beam_option, overwrite=args.overwrite)
    except ConversionError as e:
        print(f"contrastive-jax data repack: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2), flush=True)
    return 0


def run(args, overrides) -> int:
    if overrides:
        print("contrastive-jax data: --config.* overrides are not used here", file=sys.stderr)
        return 2
    if args.data_command == "convert":
        return _convert(args)
    if args.data_command == "repack":
        return _repack(args)

    from contrastive_jax.data.config import defaults
    from contrastive_jax.data.convert import iter_captions
    from contrastive_jax.data.tokenizer import SentencePieceTokenizer, TextRules, train_sentencepiece

    cfg = defaults()
    cfg.name, cfg.data_dir = args.name, args.data_dir
    rules = TextRules(lowercase=not args.no_lowercase, clean=args.clean)
    try:
        with stdout_to_stderr():  # sentencepiece's trainer logs; stdout carries the JSON result only
            proto = train_sentencepiece(iter_captions(cfg, args.split), vocab_size=args.vocab_size,
                                        rules=rules, model_type=args.model_type)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"contrastive-jax data train-tokenizer: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "wb") as f:
        f.write(proto)
    tok = SentencePieceTokenizer(proto, max_len=16, rules=rules)
    print(json.dumps({"output": os.path.abspath(args.output), "pieces": tok.vocab_size - 3}))
    print(f"train with: --config.data.tokenizer.kind=sentencepiece --config.data.tokenizer.path="
          f"{os.path.abspath(args.output)}", file=sys.stderr)
    return 0
