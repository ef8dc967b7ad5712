"""Command line: ``python -m minigpt {course,train,generate,compare,bench,site,student-notebooks,grade,sync-notebooks}``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path


def cmd_course(args: argparse.Namespace) -> int:
    """Execute the chapters in order (fresh kernels) and save the executed copies in ``--out``."""
    from minigpt.notebooks import chapter_paths, execute_notebook, parse_chapters, write_notebook_atomic

    try:
        wanted = parse_chapters(args.chapters)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = [p for p in chapter_paths() if wanted is None or p.name[:2] in wanted]
    if not paths:
        print(f"no chapter notebooks found for chapters {', '.join(wanted or [])}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for path in paths:
        start = time.perf_counter()
        print(f"{path.name} ...", flush=True)
        nb = execute_notebook(path, smoke=args.smoke, timeout=args.timeout, progress=True)
        write_notebook_atomic(nb, out / path.name)
        print(f"{path.name} done in {time.perf_counter() - start:.0f} s -> {out / path.name}", flush=True)
    print(f"{len(paths)} chapters in {time.perf_counter() - total:.0f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Pretrain the tiny GPT on Shakespeare and report losses per token and per character."""
    from dataclasses import replace

    from minigpt.io import check_int
    from minigpt.pretrained import SMOKE, TINY, pretrain, refuse_overwrite, shakespeare_split, unseen_in_finetuning
    from minigpt.tokenizer import get_compact_vocab
    from minigpt.train import check_device_name, nats_per_character

    recipe = SMOKE if args.smoke else TINY
    if args.steps is not None:
        recipe = replace(recipe, steps=check_int("--steps", args.steps, 1))
    check_device_name(args.device)
    # the default path names the recipe, so a short or smoke run never replaces the 1,000-step model
    args.out = args.out or f"runs/{recipe.name}.safetensors"
    refuse_overwrite(args.out, recipe, force=args.force)
    model, history = pretrain(recipe, checkpoint=args.out, device=args.device)
    _, val_ids = shakespeare_split()
    model.to("cpu")
    result = nats_per_character(model, val_ids, get_compact_vocab().decode)
    print(f"recipe {recipe.name}: {history.seconds:.0f} s, {history.tokens / history.seconds:,.0f} tokens/s")
    print(f"validation: {result['nats_per_token']:.3f} nats/token, {result['nats_per_char']:.3f} nats/char "
          f"({result['bits_per_char']:.3f} bits/char) over {result['chars']:,} characters")
    print(f"fine-tuning tokens that pretraining never saw: {100 * unseen_in_finetuning():.2f} % (goal 0)")
    print(f"checkpoint: {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample text from a checkpoint (default: the course's pretrained tiny model)."""
    from minigpt.generate import check_sampling, generate_text
    from minigpt.io import UserError, check_int
    from minigpt.pretrained import get_pretrained
    from minigpt.tokenizer import get_compact_vocab
    from minigpt.train import load_model

    check_sampling(args.max_new_tokens, args.temperature, args.top_k)  # before a model is loaded or trained
    check_int("--seed", args.seed, 0, 2**63 - 1)
    vocab = get_compact_vocab()
    if not vocab.encode(args.prompt):
        raise UserError("--prompt is empty: give at least one character to continue from")
    model = load_model(args.checkpoint) if args.checkpoint else get_pretrained(smoke=args.smoke)
    print(args.prompt + generate_text(model, args.prompt, vocab.encode, vocab.decode, args.max_new_tokens,
                                      args.temperature, args.top_k, vocab.eot_id, args.seed))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Rewrite notebook cells that copy package code (``# minigpt-source:``) from the package, and add or
    refresh each chapter's Open-in-Colab badge and Colab setup cell."""
    from minigpt.notebooks import chapter_paths, ensure_colab_cells, sync_notebook

    for path in chapter_paths():
        changed = sync_notebook(path)
        if changed:
            print(f"{path.name}: {changed} cell(s) rewritten")
        if ensure_colab_cells(path):
            print(f"{path.name}: Colab badge and setup cell updated")
    return 0


# Subcommands implemented in their own modules parse their own arguments (options in any order).
DELEGATED = {
    "compare": ("compare", "main", "head-to-head table of the fine-tuning methods"),
    "bench": ("bench", "main", "speed and memory benchmarks against peft"),
    "student-notebooks": ("classroom", "student_notebooks_main", "write student versions of the chapters"),
    "grade": ("classroom", "grade_main", "grade a student's notebook"),
    "site": ("site", "main", "render the executed chapters and the README to a static HTML site"),
}


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user error (bad argument, missing or damaged file) prints one line on stderr and
    exits with status 2, as argparse does; a traceback means a bug."""
    from minigpt import apply_cpu_thread_settings

    apply_cpu_thread_settings()  # before anything imports torch (only if the cores are busy); kernels inherit it
    from minigpt.io import UserError

    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except (UserError, OSError) as err:  # OSError: a file missing, unreadable or unwritable; it is named
        code = getattr(err, "exit_code", 2 if isinstance(err, (FileNotFoundError, IsADirectoryError,
                                                                 NotADirectoryError, PermissionError)) else 1)
        command = f" {argv[0]}" if argv and not argv[0].startswith("-") else ""
        print(f"python -m minigpt{command}: error: {err}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("python -m minigpt: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        module, function, _ = DELEGATED[argv[0]]
        return getattr(importlib.import_module(f"minigpt.{module}"), function)(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m minigpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("course", help=cmd_course.__doc__)
    p.add_argument("--out", default="runs/course", help="folder for the executed notebooks")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (seconds per chapter)")
    p.add_argument("--chapters", nargs="*", help="chapter numbers to run, e.g. 01 05 (default: all)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.set_defaults(run=cmd_course)

    p = sub.add_parser("train", help=cmd_train.__doc__)
    p.add_argument("--out", default=None, help="checkpoint path (default: runs/<recipe name>.safetensors)")
    p.add_argument("--force", action="store_true", help="replace --out even if it holds another recipe's model")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda if available, else cpu)")
    p.add_argument("--smoke", action="store_true")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("generate", help=cmd_generate.__doc__)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--smoke", action="store_true")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("sync-notebooks", help=cmd_sync.__doc__)
    p.set_defaults(run=cmd_sync)

    for name, (_, _, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (see: python -m minigpt {name} --help)")

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
