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
from .errors import Interrupted, LlmpyError


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
    except Interrupted as e:
        print(f"llmpy {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"llmpy {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:
        # an allocation larger than the machine (NumPy names its size): the
        # user's to fix, like a bad flag
        if args.debug:
            raise
        print(f"llmpy {args.command}: error: out of memory ({e or 'an allocation failed'}); "
              "a smaller --model, -B or -T", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole
    usage first, a dozen lines for `train`) pointing at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    ap = _Parser(prog="llmpy", description="GPT-2 training in plain Python and hand-written kernels")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--version", action="version", version=f"llmpy {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    return ap


# ---------------------------------------------------------------------- prepare

def _prepare_parser(sub):
    p = sub.add_parser("prepare", help="turn your text files, or a built-in corpus, into token shards",
                       description="Tokenize your own files (or one built-in corpus) into llm.c token shards: "
                                   "NAME_val_000000.bin first, then NAME_train_*.bin, in OUT.")
    p.add_argument("inputs", nargs="+", metavar="PATH|CORPUS",
                   help="your files, folders (recursive) or globs: .txt/.md a document per file, .jsonl a "
                        "document per line (--field), .parquet a document per row (--column), any other "
                        "file named directly is read as text; or one built-in corpus: pydoc (embedded, no "
                        "network), tinyshakespeare, tinystories, fineweb-edu, hellaswag (downloaded). "
                        "An existing file or folder wins over a corpus of the same name")
    p.add_argument("--out", default=None, help="output directory (default data/NAME)")
    p.add_argument("--shard-size", type=int, default=None, help="tokens per shard (default 100M)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPUs)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   default=None, help="no progress bars")
    # None means "not given": a flag of the other kind of input is an error.
    own = p.add_argument_group("your own files")
    own.add_argument("--name", default=None, help="prefix of the shard files (default: the first PATH's stem)")
    own.add_argument("--field", default=None, help="JSON Lines: the field that holds the text (default text)")
    own.add_argument("--column", default=None, help="Parquet: the column that holds the text (default text)")
    own.add_argument("--tokenizer", default=None, metavar="TOK",
                     help="a Hugging Face tokenizer.json, or a directory holding one, instead of GPT-2's; "
                          "its end-of-text token separates the documents. Shards are uint16 while its "
                          "vocabulary fits (<= 65,536 ids), else uint32 (llm.c's Llama 3 shards)")
    own.add_argument("--val-fraction", type=float, default=None,
                     help="share of the tokens for the val split, whole documents where possible "
                          "(default 0.1, at least 1,025 tokens unless that is over half)")
    corpora = p.add_argument_group("built-in corpora")
    corpora.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    corpora.add_argument("--shards", type=int, default=None, help="stop after N shards (val included)")
    corpora.add_argument("--val-tokens", type=int, default=None, help="val shard size (default per corpus)")
    corpora.add_argument("--split", dest="splits", action="append", default=None,
                         help="hellaswag split to fetch (train/val/test; repeatable; default val)")


def _prepare(args):
    from .data.prepare import prepare
    from .data.text import corpus_named, prepare_text

    def given(names):
        return {k: getattr(args, k) for k in names if getattr(args, k) is not None}

    def flags(opts):
        names = ["--split" if k == "splits" else "--" + k.replace("_", "-") for k in opts]
        return ", ".join(names) + (" applies" if len(names) == 1 else " apply")

    shared = ("shard_size", "workers", "progress")
    own = ("name", "field", "column", "val_fraction", "tokenizer")
    corpus_only = ("max_tokens", "shards", "val_tokens", "splits")
    corpus = corpus_named(args.inputs)
    if corpus is not None:
        if given(own):
            raise LlmpyError(f"{flags(given(own))} to your own files, not to the corpus {corpus}")
        info = prepare(corpus, args.out, **given(shared + corpus_only))
    else:
        if given(corpus_only):
            raise LlmpyError(f"{flags(given(corpus_only))} to the built-in corpora, not to your files")
        info = prepare_text(args.inputs, args.out, **given(shared + own))
    print(json.dumps({k: str(v) for k, v in info.items()}))


# ---------------------------------------------------------------------- train

def _train_parser(sub):
    p = sub.add_parser("train", help="train a GPT-2 or Llama model (no flags: a small GPT-2 on the embedded pydoc "
                                     "corpus)",
                       description="Train a GPT-2 or Llama model. Every flag is optional: with none, the d4 preset "
                                   "trains for 400 steps on the embedded pydoc corpus. Fine-tuning a Llama "
                                   "directory: prepare the text with its tokenizer (llmpy prepare FILES "
                                   "--tokenizer DIR), then --model DIR; the samples decode with DIR's "
                                   "tokenizer.json, which every checkpoint copies.")
    TrainConfig.add_arguments(p)


def _train(args):
    from .train import train
    train(TrainConfig.from_args(args), TrainConfig.given_flags(args))


# ---------------------------------------------------------------------- sample

def _sample_parser(sub):
    p = sub.add_parser("sample", help="generate text from a run directory or a model",
                       description="Generate text. MODEL is a run directory of `llmpy train` (its newest "
                                   "checkpoint that verifies), a checkpoint or Hugging Face model directory, "
                                   "an llm.c .bin, or a hub name such as gpt2.")
    p.add_argument("ckpt", metavar="MODEL")
    p.add_argument("--prompt", default=None,
                   help="text to continue (default: start from the tokenizer's end-of-text token)")
    p.add_argument("--prompt-file", default=None, metavar="PATH", help="read the prompt from a UTF-8 file, as is")
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate per sample (>= 0)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples, sample i from seed + i")
    p.add_argument("--temperature", type=float, default=1.0, help=">= 0; 0: greedy (the most likely token)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (>= 1)")
    p.add_argument("--top-p", type=float, default=None, help="keep the most likely tokens of mass p (0 < p <= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole context for every token instead of using the KV cache")
    p.add_argument("--tokenizer", default=None, metavar="TOK",
                   help="a tokenizer.json, or a directory holding one (default: the model directory's "
                        "tokenizer.json, else GPT-2's for GPT-2's vocabulary)")
    p.add_argument("--device", default="cpu", choices=DEVICES)


def _sample(args):
    from .data.hf_tokenizer import decode_sampled, model_tokenizer
    from .families import load, locate
    from .inference import check_sampling, end_ids, generate, resolve_model
    check_sampling(args.temperature, args.top_k, args.top_p, args.tokens)
    if args.num_samples < 1:
        raise LlmpyError(f"--num-samples {args.num_samples}: must be >= 1")
    if args.prompt is not None and args.prompt_file is not None:
        raise LlmpyError("give --prompt or --prompt-file, not both")
    prompt = args.prompt or ""
    if args.prompt_file is not None:
        try:
            prompt = open(args.prompt_file, "rb").read().decode("utf-8")
        except OSError as e:
            raise LlmpyError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise LlmpyError(f"--prompt-file {args.prompt_file}: not UTF-8 text (byte {e.start}); "
                             "save it as UTF-8") from None
    say = lambda text: print(f"llmpy sample: {text}", file=sys.stderr, flush=True)  # noqa: E731
    path = locate(resolve_model(args.ckpt, say)[0])
    model = load(path, device=args.device)
    tok, what = model_tokenizer(model.config.vocab_size, args.tokenizer, path if path.is_dir() else None)
    if tok is None:
        raise LlmpyError(f"{args.ckpt}: {what} (no tokenizer.json beside the model, and not GPT-2's); pass "
                         "--tokenizer TOK, the tokenizer.json its data was prepared with")
    eot = end_ids(model.config, tok)          # config.json's eos_token_id, else the tokenizer's
    prompt_ids = tok.encode(prompt) if prompt else [tok.eot]
    for i in range(args.num_samples):
        bar = None
        if sys.stderr.isatty():           # progress on a terminal only; it goes away when done
            from tqdm import tqdm
            bar = tqdm(total=args.tokens, unit="token", file=sys.stderr, leave=False, dynamic_ncols=True)
        ids = generate(model, prompt_ids, args.tokens, args.temperature, args.top_k, args.top_p, args.seed + i,
                       eot, use_cache=args.use_cache, progress=None if bar is None else bar.update)
        if bar is not None:
            bar.close()
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} (seed {args.seed + i}) ---")
        print(prompt + decode_sampled(tok, ids), flush=True)


# ---------------------------------------------------------------------- eval

def _eval_parser(sub):
    p = sub.add_parser("eval", help="validation loss (--data) or HellaSwag accuracy (--hellaswag) of a run or model",
                       description="Evaluate a run directory of `llmpy train` (its newest checkpoint that "
                                   "verifies), a checkpoint or model directory, an llm.c .bin or a hub name.")
    p.add_argument("ckpt", metavar="MODEL")
    p.add_argument("--data", default=None, help="glob of val shards: mean loss and perplexity")
    p.add_argument("--hellaswag", default=None, metavar="FILE",
                   help="HellaSwag .jsonl, or llm.c's HellaSwag .bin: acc and acc_norm")
    p.add_argument("--limit", type=int, default=None, help="HellaSwag: score only the first N examples")
    p.add_argument("--steps", type=int, default=None,
                   help="--data: number of val batches (default, and at most: one pass over the data)")
    p.add_argument("-B", "--batch-size", type=int, default=None,
                   help="default: the run's own (a training checkpoint), else 4")
    p.add_argument("-T", "--seq-len", type=int, default=None,
                   help="default: the run's own (a training checkpoint), else min(block size, 1024)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", choices=DEVICES)


def _eval(args):
    from . import evals, load
    from .inference import resolve_model
    if (args.data is None) == (args.hellaswag is None):
        raise LlmpyError("eval needs exactly one of --data PATTERN (val loss) or --hellaswag FILE (accuracy)")
    for flag, v in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                    ("--limit", args.limit)):
        if v is not None and v < 1:
            raise LlmpyError(f"{flag} {v}: must be >= 1")
    say = lambda text: print(f"llmpy eval: {text}", file=sys.stderr, flush=True)  # noqa: E731

    def progress_bar(total, unit):        # progress on a terminal only; it goes away when done
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm
        return tqdm(total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
    source, ckpt = resolve_model(args.ckpt, say)
    model = load(source, device=args.device)
    if args.data is not None:
        from .checkpoint import read_train_state
        from .data.shards import DataLoader
        run = read_train_state(ckpt / "train_state.json").get("train_config", {}) if ckpt else {}
        B = args.batch_size or run.get("batch_size") or 4
        T = args.seq_len or run.get("seq_len") or min(model.config.block_size, 1024)
        if T > model.config.block_size:
            raise LlmpyError(f"--seq-len {T} exceeds the model's block size {model.config.block_size}")
        loader = DataLoader(args.data, B, T, shuffle=False)
        loader.check_vocab(model.config.vocab_size, args.ckpt)    # another tokenizer's ids: one line, not an IndexError
        n = evals.batches_per_pass(loader) if args.steps is None else min(args.steps, evals.batches_per_pass(loader))
        if args.steps is not None and args.steps > n:
            say(f"note: --steps {args.steps} is more than one pass over {args.data} ({n} batches of B={B} T={T}); "
                f"using {n}")
        bar = progress_bar(n, "batch")
        res = evals.val_report(model, loader, args.steps, progress=None if bar is None else bar.update)
        text = (f"val loss {res['val_loss']:.4f}  perplexity {res['perplexity']:.2f}  "
                f"({res['batches']} batches of B={B} T={T}, {res['tokens']:,} tokens)")
    else:
        bar = None
        on_tty = sys.stderr.isatty()

        def progress(n, total, acc_norm):
            nonlocal bar
            if on_tty and bar is None:
                bar = progress_bar(total, "example")
            if bar is not None:
                bar.set_postfix_str(f"acc_norm {acc_norm:.4f}", refresh=False)
                bar.update()
        from .data.hf_tokenizer import model_tokenizer
        tokenizer, _ = model_tokenizer(model.config.vocab_size, None, source)
        evals.check_hellaswag_tokenizer(args.hellaswag, tokenizer, args.ckpt,
                                        how="put it in the model's directory as tokenizer.json")
        res = evals.hellaswag(model, args.hellaswag, limit=args.limit, tokenizer=tokenizer, progress=progress)
        if args.json:
            res.pop("per_example")
        text = (f"HellaSwag on {res['examples']} examples: acc {res['acc']:.4f}  "
                f"acc_norm {res['acc_norm']:.4f}")
    if bar is not None:
        bar.close()
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
    from .bench import add_suite_arguments
    p = sub.add_parser("bench", help="time a full training step (optionally against PyTorch), or the CPU suite")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--model", default=None, help="preset or hub name (default d12)")
    p.add_argument("-B", "--batch-size", type=int, default=None, help="default 4")
    p.add_argument("-T", "--seq-len", type=int, default=None, help="default 64")
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
    p.add_argument("--suite", action="store_true",
                   help="the CPU suite: every shape a CPU user runs, llmpy and PyTorch eager fp32 each in a "
                        "child process of its own, taking turns; ratio, floor share and peak RSS of both "
                        "(needs torch: pip install -e '.[test]')")
    add_suite_arguments(p)


def _bench(args):
    from .bench import bench, print_table, run_suite
    suite_only = [f for f, on in (("--runs", args.runs is not None), ("--shapes", args.shapes is not None),
                                  ("--bf16", args.bf16), ("--quick", args.quick)) if on]
    if args.suite:
        # the suite sets its own shapes and sides: a flag of the single run would be ignored
        single = [f for f, on in (("--model", args.model is not None), ("-B", args.batch_size is not None),
                                  ("-T", args.seq_len is not None), ("--compare", args.compare),
                                  ("--only", args.only), ("--compile", args.compile is not None),
                                  ("--profile", args.profile), ("--device cuda", args.device != "cpu"),
                                  ("--dtype bf16", args.dtype != "fp32")) if on]
        if single:
            raise LlmpyError(f"--suite runs its own shapes on the CPU, so {', '.join(single)} does not apply; "
                             "choose shapes with --shapes MODEL:B:T,... and add PyTorch's bf16 step with --bf16")
        return run_suite(args.shapes, args.runs, args.steps, args.bf16, args.quick, args.json)
    if suite_only:
        raise LlmpyError(f"{', '.join(suite_only)} only with --suite")
    # the shape flags default to None (so that --suite can tell them given): bench() has the defaults
    shape = {k: v for k, v in (("model", args.model), ("B", args.batch_size), ("T", args.seq_len)) if v is not None}
    res = bench(args.device, steps=args.steps, compare=args.compare, dtype=args.dtype, only=args.only,
                compile=args.compile, graphs=args.graphs, profile=args.profile, **shape)
    print(json.dumps(res) if args.json else print_table(res))


# name -> (add its parser, run it); the order is --help's
COMMANDS = {"prepare": (_prepare_parser, _prepare), "train": (_train_parser, _train),
            "sample": (_sample_parser, _sample), "eval": (_eval_parser, _eval),
            "convert": (_convert_parser, _convert), "bench": (_bench_parser, _bench)}
