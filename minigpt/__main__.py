"""The course's command line: run the chapters, pretrain and sample the tiny model, compare the
fine-tuning methods, build the site and the student versions, grade notebooks."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path


def cmd_course(args: argparse.Namespace) -> int:
    """Execute the chapters in order (fresh kernels) and save the executed copies in ``--out``."""
    from minigpt._validate import UserError
    from minigpt.course.chapters import chapter_paths, parse_chapters, write_notebook_atomic
    from minigpt.course.colab import chapters_missing_message
    from minigpt.course.execute import execute_notebook
    from minigpt.device import check_record_destination, run_record, write_run_record
    from minigpt.io import cache_dir, check_writable_file, check_writable_folder

    try:
        wanted = parse_chapters(args.chapters)
    except ValueError as err:
        raise UserError(f"--chapters: {err}") from None
    every = chapter_paths(args.chapters_dir)
    if not every:
        raise UserError(chapters_missing_message(args.chapters_dir))
    paths = [p for p in every if wanted is None or p.name[:2] in wanted]
    if not paths:
        raise UserError(f"--chapters: no chapters {', '.join(wanted or [])} in {args.chapters_dir}")
    # every destination before the chapters run, not after them: the executed copies never
    # replace the chapters, and the record replaces nothing but a record
    out, chapters_dir = _real(args.out), _real(args.chapters_dir)
    if _inside(out, chapters_dir):
        raise UserError(
            f"--out {args.out} is the chapters folder or inside it ({args.chapters_dir}): the "
            "executed copies would replace the chapters; choose another folder"
        )
    if args.json is not None:
        json_path = _real(args.json)
        for folder, option in ((out, "--out"), (chapters_dir, "--chapters-dir")):
            if _inside(json_path, folder):
                raise UserError(
                    f"--json {args.json} is inside the {option} folder, among the notebooks; "
                    "write the record elsewhere"
                )
        if json_path.suffix.lower() == ".ipynb":
            raise UserError(f"--json {args.json} names a notebook; a record is a .json file")
        check_record_destination(args.json, "--json", "course")
    check_writable_folder(args.out, "--out")
    for path in paths:
        check_writable_file(Path(args.out) / path.name, "--out")
    out = Path(args.out)
    cache = cache_dir()
    cache_was_empty = not (cache.is_dir() and any(cache.iterdir()))
    total = time.perf_counter()
    times = []
    for path in paths:
        start = time.perf_counter()
        print(f"{path.name} ...", flush=True)
        nb = execute_notebook(path, smoke=args.smoke, timeout=args.timeout, progress=True)
        write_notebook_atomic(nb, out / path.name)
        seconds = time.perf_counter() - start
        times.append({"chapter": path.name[:2], "notebook": path.stem, "seconds": seconds})
        print(f"{path.name} done in {seconds:.0f} s -> {out / path.name}", flush=True)
    total = time.perf_counter() - total
    print(f"{len(paths)} chapters in {total:.0f} s")
    if args.json is not None:
        payload = {
            "smoke": args.smoke,
            "cache_was_empty": cache_was_empty,
            # whether these are all the chapters, so that the results page says "the whole course"
            # only of a run of every chapter
            "every_chapter": len(paths) == len(every),
            "chapters": times,
            "seconds": total,
        }
        write_run_record(args.json, run_record("course", "course", _argv(args), payload))
        print(f"record: {args.json}")
    return 0


def _real(path: str | Path) -> Path:
    """``path`` absolute with symbolic links resolved, for telling whether two paths overlap."""
    return Path(os.path.realpath(Path(path).expanduser()))  # a loop of links raises nothing


def _inside(path: Path, folder: Path) -> bool:
    """Whether the resolved ``path`` is the resolved ``folder`` or lies inside it."""
    return path == folder or folder in path.parents


def _argv(args: argparse.Namespace) -> list[str]:
    """The command's own arguments as given (for the record's ``command``)."""
    return list(getattr(args, "argv", []))


def cmd_train(args: argparse.Namespace) -> int:
    """Pretrain the tiny GPT on Shakespeare and report losses per token and per character."""
    from dataclasses import asdict, replace

    from minigpt._validate import UserError, check_int
    from minigpt.device import check_record_destination, run_record, write_run_record
    from minigpt.io import check_writable_file, names_a_folder
    from minigpt.lab.pretrained import (
        SMOKE,
        TINY,
        pretrain,
        refuse_overwrite,
        shakespeare_split,
        unseen_in_finetuning,
    )
    from minigpt.tokenizer import get_compact_vocab
    from minigpt.train import check_device_name, nats_per_character

    command_start = time.perf_counter()
    recipe = SMOKE if args.smoke else TINY
    if args.steps is not None:
        recipe = replace(recipe, steps=check_int("--steps", args.steps, 1))
    # the device and its precision are part of the recipe's name, as get_pretrained names its file
    recipe = replace(recipe, device=check_device_name(args.device))
    # the default path names the recipe, so a short or smoke run never replaces the 1,000-step
    # model; an --out that is a folder (or ends with a separator) gets the same name inside it
    if args.out is None:
        args.out = f"runs/{recipe.name}.safetensors"
    elif names_a_folder(args.out) or Path(args.out).is_dir():
        args.out = str(Path(args.out) / f"{recipe.name}.safetensors")
    check_writable_file(args.out, "--out")  # before training, not after it
    if args.json is not None:
        if _real(args.json) == _real(args.out):
            raise UserError(
                "--json and --out name the same file: the record would replace the model"
            )
        check_record_destination(args.json, "--json", "pretraining")
    refuse_overwrite(args.out, recipe, force=args.force)
    model, history = pretrain(recipe, checkpoint=args.out, device=args.device)
    _, val_ids = shakespeare_split()
    trained_on = str(next(model.parameters()).device)
    model.to("cpu")
    result = nats_per_character(model, val_ids, get_compact_vocab().decode)
    print(
        f"recipe {recipe.name}: {history.seconds:.0f} s, {history.tokens / history.seconds:,.0f} "
        "tokens/s"
    )
    print(
        f"validation: {result['nats_per_token']:.3f} nats/token, {result['nats_per_char']:.3f} "
        "nats/char "
        f"({result['bits_per_char']:.3f} bits/char) over {result['chars']:,} characters"
    )
    unseen = unseen_in_finetuning()
    print(f"fine-tuning tokens that pretraining never saw: {100 * unseen:.2f} % (goal 0)")
    print(f"checkpoint: {args.out}")
    if args.json is not None:
        payload = {
            "smoke": args.smoke,
            "recipe": asdict(recipe),
            "recipe_name": recipe.name,
            "model": asdict(model.cfg),
            "parameters": model.num_parameters(),
            "device": trained_on,
            "precision": history.precision,
            "seconds": time.perf_counter() - command_start,
            "train_seconds": history.seconds,
            "tokens": history.tokens,
            "tokens_per_second": history.tokens / history.seconds if history.seconds else None,
            "val_loss": history.val_loss[-1] if history.val_loss else None,
            "held_out": result,
            "unseen_in_finetuning": unseen,
        }
        write_run_record(args.json, run_record("pretraining", "train", _argv(args), payload))
        print(f"record: {args.json}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample text from a checkpoint (default: the course's pretrained tiny model)."""
    from minigpt._validate import UserError, check_int
    from minigpt.generate import check_sampling, generate_text
    from minigpt.lab.pretrained import get_pretrained
    from minigpt.tokenizer import compact_vocab_sha256, get_compact_vocab
    from minigpt.train import load_model

    # before a model is loaded or trained
    check_sampling(args.max_new_tokens, args.temperature, args.top_k)
    check_int("--seed", args.seed, 0, 2**63 - 1)
    vocab = get_compact_vocab()
    if not vocab.encode(args.prompt):
        raise UserError("--prompt is empty: give at least one character to continue from")
    # a checkpoint trained with another vocabulary would print other text
    if args.checkpoint is not None:
        model = load_model(args.checkpoint, vocab_sha256=compact_vocab_sha256())
        if model.cfg.vocab_size != len(vocab):
            raise UserError(
                f"checkpoint {args.checkpoint} has {model.cfg.vocab_size} output tokens, the "
                f"compact vocabulary {len(vocab)}: it was not trained with this vocabulary"
            )
    else:
        model = get_pretrained(smoke=args.smoke)
    print(
        args.prompt
        + generate_text(
            model,
            args.prompt,
            vocab.encode,
            vocab.decode,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            vocab.eot_id,
            args.seed,
        )
    )
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Rewrite notebook cells that copy package code (``# minigpt-source:``) from the package, and
    add or refresh each chapter's Open-in-Colab badge and Colab setup cell."""
    from minigpt.course.chapters import chapter_paths
    from minigpt.course.colab import chapters_missing_message, ensure_colab_cells
    from minigpt.course.source import sync_notebook

    paths = chapter_paths(args.chapters_dir)
    if not paths:
        print(
            f"python -m minigpt sync-notebooks: {chapters_missing_message(args.chapters_dir)}",
            file=sys.stderr,
        )
        return 2
    for path in paths:
        changed = sync_notebook(path)
        if changed:
            print(f"{path.name}: {changed} cell(s) rewritten")
        if ensure_colab_cells(path, args.repository):
            print(f"{path.name}: Colab badge and setup cell updated")
    return 0


# Subcommands implemented in their own modules parse their own arguments (options in any order).
DELEGATED = {
    "compare": ("lab.lab", "main", "head-to-head table of the fine-tuning methods"),
    "dora-analysis": (
        "lab.dora_analysis",
        "main",
        "DoRA's magnitude/direction analysis (figure 2) by the paper's protocol",
    ),
    "bench": ("lab.bench", "main", "speed and memory benchmarks against peft"),
    "student-notebooks": (
        "classroom.student",
        "student_notebooks_main",
        "write student versions of the chapters",
    ),
    "grade": ("classroom.student", "grade_main", "grade a student's notebook"),
    "results": (
        "course.results",
        "main",
        "write docs/results.md from the measurement records in docs/records/",
    ),
    "site": (
        "course.site",
        "main",
        "render the executed chapters and the README to a static HTML site",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user error (bad argument, missing or damaged file) prints one line on stderr
    and exits with status 2, as argparse does; a traceback means a bug."""
    from minigpt import apply_cpu_thread_settings

    # before anything imports torch (only if the cores are busy); kernels inherit it
    apply_cpu_thread_settings()
    from minigpt._validate import UserError

    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    # OSError: a file missing, unreadable or unwritable; it is named
    except (
        UserError,
        OSError,
    ) as err:
        code = getattr(
            err, "exit_code", 2
        )  # every file problem (disk full too) is the user's to fix
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
    from minigpt import __version__
    from minigpt._cli import (
        HelpFormatter,
        folder_arg,
        github_repository,
        make_parser,
        path_arg,
        plain,
        positive_int,
    )
    from minigpt.course.chapters import CHAPTERS_DIR, CHAPTERS_ENV
    from minigpt.course.colab import REPOSITORY_URL

    parser = argparse.ArgumentParser(
        prog="python -m minigpt",
        description=plain(__doc__),
        epilog="example:\n  python -m minigpt course --smoke --chapters 01 02\n\n"
        "Each command has its own help: python -m minigpt COMMAND --help",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"minigpt-lora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, example: str) -> argparse.ArgumentParser:  # noqa: ANN001
        # each sub-parser is configured like the delegated commands' parsers (minigpt._cli)
        template = make_parser(f"python -m minigpt {name}", run.__doc__, example)
        p = sub.add_parser(
            name,
            help=plain(run.__doc__).split("\n\n")[0].replace("\n", " "),
            description=template.description,
            epilog=template.epilog,
            formatter_class=HelpFormatter,
            allow_abbrev=False,
        )
        p.set_defaults(run=run)
        return p

    chapters_help = (
        f"folder holding the chapter notebooks (default: ${CHAPTERS_ENV}, else the checkout's "
        "chapters/)"
    )
    p = command("course", cmd_course, "python -m minigpt course --smoke --chapters 01 05")
    p.add_argument(
        "--out", default="runs/course", type=path_arg, help="folder for the executed notebooks"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes and few steps (seconds per chapter)"
    )
    p.add_argument(
        "--chapters", nargs="+", help="chapter numbers to run, e.g. 01 05 (default: all)"
    )
    p.add_argument("--chapters-dir", default=CHAPTERS_DIR, type=folder_arg, help=chapters_help)
    p.add_argument("--timeout", type=positive_int, default=1800, help="seconds per cell")
    p.add_argument(
        "--json",
        default=None,
        type=path_arg,
        help="also write a record of each chapter's time and the machine to this JSON file "
        "(default: none; docs/records/course.json feeds docs/results.md)",
    )

    p = command("train", cmd_train, "python -m minigpt train --smoke --out runs/smoke.safetensors")
    p.add_argument(
        "--out",
        default=None,
        type=path_arg,
        help="checkpoint path; a folder (an existing one, or a path ending in a separator, "
        "created if needed) gets <recipe name>.safetensors inside it (default: "
        "runs/<recipe name>.safetensors)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace --out even if it holds another recipe's model"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument(
        "--device", default=None, help="cpu, cuda or mps (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="the micro recipe: a few steps, for a quick check"
    )
    p.add_argument(
        "--json",
        default=None,
        type=path_arg,
        help="also write a record of the recipe, times, losses and the machine to this JSON file "
        "(default: none; docs/records/pretraining.json feeds docs/results.md)",
    )

    p = command("generate", cmd_generate, 'python -m minigpt generate --prompt "JULIET:" --seed 7')
    p.add_argument(
        "--checkpoint",
        default=None,
        type=path_arg,
        help="a checkpoint written by train (default: the course's pretrained model, trained "
        "and cached on first use)",
    )
    p.add_argument("--prompt", default="ROMEO:\n", help="text to continue (default: 'ROMEO:\\n')")
    p.add_argument("--max-new-tokens", type=int, default=120, help="tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens")
    p.add_argument("--seed", type=int, default=123, help="random seed of the sampling")
    p.add_argument(
        "--smoke", action="store_true", help="use the micro pretrained model (seconds to train)"
    )

    p = command(
        "sync-notebooks",
        cmd_sync,
        "python -m minigpt sync-notebooks --repository https://github.com/OWNER/minigpt-lora",
    )
    p.add_argument(
        "--repository",
        default=REPOSITORY_URL,
        type=github_repository,
        help="GitHub address the Colab badges and setup cells point at (a fork sets its own)",
    )
    p.add_argument("--chapters-dir", default=CHAPTERS_DIR, type=folder_arg, help=chapters_help)

    for name, (_, _, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (see: python -m minigpt {name} --help)")

    args = parser.parse_args(argv)
    args.argv = argv[1:]  # the command's arguments, for the records
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
