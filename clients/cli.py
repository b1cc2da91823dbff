"""The `lsrt` command line.

Local commands (`generate`, `convert`, `models`) use the runtime in-process; client commands
(`chat`, `sessions`) go through the SDK to a server (an embedded one when no --addr is given).
Every `LsrtError` ends the command with one line on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lsrt.runtime.errors import LsrtError

DEFAULT_MODEL = "smollm2-135m"


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry name, HF directory or .gguf file (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--attention", default=None, choices=["sdpa", "hybrid", "triton"])
    p.add_argument("--kv-budget-mb", type=int, default=None)
    add_tree_budget_arg(p)


def add_tree_budget_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tree-budget", default=None, choices=["auto", "cost", "full"],
                   help="draft-tree nodes: those worth their measured verify cost (cost), the "
                        "whole budget (full); default auto: cost on cpu, full on cuda")


def runner_config(args: argparse.Namespace):
    from lsrt.runtime.runner import RunnerConfig

    kwargs = {}
    if args.dtype:
        kwargs["dtype"] = args.dtype
    if args.attention:
        kwargs["attention"] = args.attention
    if args.kv_budget_mb:
        kwargs["kv_budget_mb"] = args.kv_budget_mb
    if args.tree_budget:
        kwargs["tree_budget"] = args.tree_budget
    return RunnerConfig.for_device(args.device, **kwargs)


def sampling_from_args(args: argparse.Namespace):
    from lsrt.runtime.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, max_tokens=args.max_tokens, stop=tuple(args.stop or ()),
                          stop_token_ids=tuple(args.stop_token_id or ()))


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--stop-token-id", action="append", type=int)


def cmd_generate(args: argparse.Namespace) -> int:
    from lsrt.runtime.llm import LLM

    if (args.prompt is None) == (args.prompt_file is None):
        raise _usage("give exactly one of --prompt or --prompt-file")
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise _usage(f"prompt file not found: {path}")
        prompt = path.read_text()
    else:
        prompt = args.prompt
    params = sampling_from_args(args)
    llm = LLM.load(args.model, runner_config(args), progress=not args.json)
    ids = llm.encode_prompt(prompt, chat=args.chat, system=args.system)

    def stream(text: str, _ids: list[int]) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    done = llm.generate(ids, params, draft=args.draft, on_text=None if args.json else stream,
                        draft_options=draft_options_from_args(args))
    g = done.generation
    if args.json:
        out = {"text": g.text, "token_ids": g.token_ids, "prompt_tokens": done.prompt_tokens,
               "completion_tokens": len(g.token_ids), "finish_reason": g.finish_reason,
               "timings": done.timings,
               "spec": {"drafter": args.draft, **g.stats.as_dict(),
                        "drafted_tokens": g.stats.drafted_tokens}}
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
    return 0


def draft_options_from_args(args: argparse.Namespace):
    from lsrt.runtime.spec.drafters import DraftOptions

    try:
        widths = tuple(int(w) for w in args.tree.split(",")) if args.tree else ()
    except ValueError:
        raise _usage(f"--tree takes comma-separated widths like 4,16,16, got {args.tree!r}")
    return DraftOptions(sink=args.draft_sink, window=args.draft_window, depth=args.draft_depth,
                        widths=widths)


def cmd_convert(args: argparse.Namespace) -> int:
    from lsrt.runtime.convert import convert

    out = convert(args.src, Path(args.out_dir))
    print(out)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lsrt.runtime import models

    if args.models_cmd == "install":
        print(models.install_model(args.name))
        return 0
    rows = models.list_models()
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    for r in rows:
        state = "installed" if r.get("installed") else "not installed"
        print(f"{r['name']:<22} {state:<14} {r.get('path') or ''}")
    return 0


def cmd_train_draft(args: argparse.Namespace) -> int:
    from lsrt.runtime.training.longspec_train import main as train_main

    return train_main(args.rest) or 0


def cmd_gen_data(args: argparse.Namespace) -> int:
    from lsrt.runtime.training.selfgen import main as gen_main

    return gen_main(args.rest) or 0


class _UsageError(LsrtError):
    pass


def _usage(msg: str) -> _UsageError:
    return _UsageError(msg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsrt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate from a prompt, in-process")
    _add_runtime_args(g)
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--system")
    g.add_argument("--draft", default="none", help="none | suffix | self | model:NAME | "
                   "longspec[:PATH] | auto (default: none)")
    g.add_argument("--draft-sink", type=int, default=4, help="draft cache sink tokens")
    g.add_argument("--draft-window", type=int, default=1020, help="draft cache window tokens")
    g.add_argument("--draft-depth", type=int, default=4, help="chain length (self, model)")
    g.add_argument("--tree", default=None, help="longspec tree widths per depth, e.g. 4,16,16")
    g.add_argument("--json", action="store_true")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert a GGUF file or registry model to an HF directory")
    c.add_argument("src")
    c.add_argument("out_dir")
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("models", help="list or install models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    ml = msub.add_parser("list")
    ml.add_argument("--json", action="store_true")
    mi = msub.add_parser("install")
    mi.add_argument("name")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train-draft", help="train a LongSpec draft layer (see docs/LONGSPEC.md)",
                       add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_train_draft)
    gd = sub.add_parser("gen-data", help="write the target's own continuations of agent traces "
                        "as draft training tokens", add_help=False)
    gd.add_argument("rest", nargs=argparse.REMAINDER)
    gd.set_defaults(func=cmd_gen_data)

    from lsrt.clients import commands  # serve, chat, sessions: they live beside the SDK

    for register in commands.REGISTER:
        register(sub)
    return parser


# Subcommands with their own argparse parser: everything after the name is theirs (argparse's
# REMAINDER does not capture a first argument that starts with "--").
PASS_THROUGH = {"train-draft": cmd_train_draft, "gen-data": cmd_gen_data}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        args = argparse.Namespace(cmd=argv[0], rest=argv[1:], func=PASS_THROUGH[argv[0]])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LsrtError as err:
        print(f"lsrt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lsrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
