"""The `llmpy` command: prepare, train, sample, eval, convert, bench.

One parser function and one run function per subcommand (`_NAME_parser`,
`_NAME`). Errors that are the user's to fix (LlmpyError) print as one line
and exit with code 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import DEVICES, DTYPES, TrainConfig
from .errors import LlmpyError


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    try:
        return COMMANDS[args.command][1](args) or 0
    except LlmpyError as e:
        if args.debug:
            raise
        print(f"llmpy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmpy {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmpy", description="GPT-2 training in plain Python and hand-written kernels")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    return ap


# ---------------------------------------------------------------------- prepare

def _prepare_parser(sub):
    p = sub.add_parser("prepare", help="turn a corpus into token shards")
    p.add_argument("name", help="pydoc (embedded, no network), tinyshakespeare, tinystories, "
                                "fineweb-edu, hellaswag (downloaded)")
    p.add_argument("--out", default=None, help="output directory (default data/NAME)")
    # Only for the downloaded, tokenized corpora; None means "not given".
    p.add_argument("--shard-size", type=int, default=None, help="tokens per shard (default 100M)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPUs)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--shards", type=int, default=None, help="stop after N shards (val included)")
    p.add_argument("--val-tokens", type=int, default=None, help="val shard size (default per corpus)")
    p.add_argument("--split", dest="splits", action="append", default=None,
                   help="hellaswag split to fetch (train/val/test; repeatable; default val)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   default=None, help="no progress bars")


def _prepare(args):
    from .data.prepare import prepare
    opts = ("shard_size", "workers", "max_tokens", "shards", "val_tokens", "splits", "progress")
    info = prepare(args.name, args.out, **{k: getattr(args, k) for k in opts if getattr(args, k) is not None})
    print(json.dumps({k: str(v) for k, v in info.items()}))


# ---------------------------------------------------------------------- train

def _train_parser(sub):
    p = sub.add_parser("train", help="train a GPT-2 model (no flags: a small model on the embedded pydoc corpus)",
                       description="Train a GPT-2 model. Every flag is optional: with none, the d4 preset "
                                   "trains for 400 steps on the embedded pydoc corpus.")
    TrainConfig.add_arguments(p)


def _train(args):
    from .train import train
    train(TrainConfig.from_args(args))


# ---------------------------------------------------------------------- sample

def _sample_parser(sub):
    p = sub.add_parser("sample", help="generate text from a model directory")
    p.add_argument("ckpt")
    p.add_argument("--prompt", default="")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole context for every token instead of using the KV cache")
    p.add_argument("--device", default="cpu", choices=DEVICES)


def _sample(args):
    from . import load
    from .data.tokenizer import Tokenizer
    from .inference import generate
    model = load(args.ckpt, device=args.device)
    tok = Tokenizer()
    prompt = tok.encode(args.prompt) if args.prompt else [tok.eot]
    ids = generate(model, prompt, args.tokens, args.temperature, args.top_k, args.top_p, args.seed, tok.eot,
                   use_cache=args.use_cache)
    print(args.prompt + tok.decode(ids))


# ---------------------------------------------------------------------- eval

def _eval_parser(sub):
    p = sub.add_parser("eval", help="validation loss (--data) or HellaSwag accuracy (--hellaswag) of a model directory")
    p.add_argument("ckpt")
    p.add_argument("--data", default=None, help="glob of val shards: mean loss and perplexity")
    p.add_argument("--hellaswag", default=None, metavar="FILE", help="HellaSwag .jsonl: acc and acc_norm")
    p.add_argument("--limit", type=int, default=None, help="HellaSwag: score only the first N examples")
    p.add_argument("--steps", type=int, default=20, help="--data: number of val batches")
    p.add_argument("-B", "--batch-size", type=int, default=4)
    p.add_argument("-T", "--seq-len", type=int, default=None, help="default: the model's block size")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", choices=DEVICES)


def _eval(args):
    from . import evals, load
    if (args.data is None) == (args.hellaswag is None):
        raise LlmpyError("eval needs exactly one of --data PATTERN (val loss) or --hellaswag FILE (accuracy)")
    model = load(args.ckpt, device=args.device)
    if args.data is not None:
        from .data.shards import DataLoader
        T = args.seq_len or model.config.block_size
        res = evals.val_report(model, DataLoader(args.data, args.batch_size, T, shuffle=False), args.steps)
        text = f"val loss {res['val_loss']:.4f}  perplexity {res['perplexity']:.2f}"
    else:
        res = evals.hellaswag(model, args.hellaswag, limit=args.limit)
        if args.json:
            res.pop("per_example")
        text = (f"HellaSwag on {res['examples']} examples: acc {res['acc']:.4f}  "
                f"acc_norm {res['acc_norm']:.4f}")
    print(json.dumps(res) if args.json else text)


# ---------------------------------------------------------------------- convert

def _convert_parser(sub):
    p = sub.add_parser("convert", help="convert a model between Hugging Face and llm.c formats")
    p.add_argument("src", help="a model directory, an llm.c .bin file, or a hub name such as gpt2")
    p.add_argument("dst", help="output: a directory (--to hf) or a .bin file (--to llmc)")
    p.add_argument("--to", required=True, choices=["hf", "llmc"])
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="llm.c weights: fp32 or bf16")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="also write GPT-2's tokenizer as an llm.c tokenizer file (e.g. gpt2_tokenizer.bin)")


def _convert(args):
    from .families import load
    from .formats import save_model
    save_model(load(args.src), args.dst, format=args.to, dtype=args.dtype)
    print(f"wrote {args.dst} ({args.to}, {args.dtype})")
    if args.tokenizer:
        from .data.tokenizer import Tokenizer
        from .formats.llmc import write_tokenizer_from
        write_tokenizer_from(args.tokenizer, Tokenizer())
        print(f"wrote {args.tokenizer} (llm.c tokenizer)")


# ---------------------------------------------------------------------- bench

def _bench_parser(sub):
    p = sub.add_parser("bench", help="time a full training step (optionally against PyTorch)")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--model", default="d12")
    p.add_argument("-B", "--batch-size", type=int, default=4)
    p.add_argument("-T", "--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=7, help="timed steps (after warm-up)")
    p.add_argument("--compare", choices=["torch"], default=None)
    p.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="bf16: the torch reference under autocast (llmpy: when its bf16 path exists)")
    p.add_argument("--only", choices=["torch"], default=None,
                   help="time the PyTorch reference alone (implies --compare torch)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the reference (default: on for cuda, off for cpu)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="cuda: launch llmpy's kernels one by one instead of replaying a CUDA graph")
    p.add_argument("--profile", action="store_true", help="also time llmpy's step op by op (a table per op)")


def _bench(args):
    from .bench import bench, print_table
    res = bench(args.device, args.model, args.batch_size, args.seq_len, args.steps, args.compare,
                dtype=args.dtype, only=args.only, compile=args.compile, graphs=args.graphs,
                profile=args.profile)
    print(json.dumps(res) if args.json else print_table(res))


# name -> (add its parser, run it); the order is --help's
COMMANDS = {"prepare": (_prepare_parser, _prepare), "train": (_train_parser, _train),
            "sample": (_sample_parser, _sample), "eval": (_eval_parser, _eval),
            "convert": (_convert_parser, _convert), "bench": (_bench_parser, _bench)}
