"""How training throughput degrades when another busy process shares the CPU cores, per thread
setting.

For each setting, the tiny model trains for ``--steps`` steps (tokens/s measured after a warm-up)
once on idle cores and once next to a competitor: a second process training the same model with
torch's default threads, as a second notebook or a second course run would. Run it on otherwise idle
cores:

    python scripts/load_test.py --steps 30                         # pretraining steps python
    scripts/load_test.py --steps 60 --workload finetune     # the fine-tuning lab's steps python
    scripts/load_test.py --speed --workload finetune        # idle only: precision x malloc setting
    python scripts/load_test.py --pool 2 --workload finetune       # idle only: one process vs 2 of
    1 thread
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORKER = r"""
import sys, time, torch
from minigpt import keep_freed_memory
from minigpt.lab.runs import prepare_model
from minigpt.model import GPTConfig, GPTModel
from minigpt.train import TrainConfig, autocast, loss_fn, make_optimizer, resolve_precision
threads, steps, workload = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
precision = resolve_precision(sys.argv[4] if len(sys.argv) > 4 else "auto", torch.device("cpu"))
method = sys.argv[5] if len(sys.argv) > 5 else "lora"
keep_freed_memory()  # as train() does; MINIGPT_MALLOC=default in the environment turns it off
if threads > 0:
    torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = GPTConfig.from_preset("tiny")
if workload == "pretrain":  # the TINY recipe's step: the whole model, 64 windows of 32 tokens
    model, shape = GPTModel(cfg), (64, cfg.context_length)
else:  # the lab's step: rank 32 on every block linear (LoRA unless told), 16 x 32, half masked
    model, shape = prepare_model(GPTModel(cfg), method, 32, 64.0), (16, cfg.context_length)
opt = make_optimizer(model, TrainConfig(steps=10, warmup_steps=1))
x = torch.randint(0, cfg.vocab_size, shape); y = torch.randint(0, cfg.vocab_size, shape)
if workload != "pretrain":
    y[:, ::2] = -100
def step():
    with autocast(torch.device("cpu"), precision):
        loss = loss_fn(model, x, y)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(steps if steps > 0 else 10**9):
    step()
print(x.numel() * steps / (time.perf_counter() - start))
"""

SETTINGS = {  # name: (environment additions, torch threads; 0 = torch's default)
    "default (2 threads)": ({}, 0),
    "OMP_WAIT_POLICY=PASSIVE, 2 threads": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    "GOMP_SPINCOUNT=1000, 2 threads": ({"GOMP_SPINCOUNT": "1000"}, 0),
    "1 thread": ({"OMP_NUM_THREADS": "1"}, 1),
    "1 thread, PASSIVE": ({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}, 1),
}


# name: (environment additions, precision), all with torch's default threads, idle cores
SPEED_SETTINGS = {
    "float32, glibc's default malloc": ({"MINIGPT_MALLOC": "default"}, "fp32"),
    "float32, freed memory kept": ({}, "fp32"),
    "bf16 autocast, glibc's default malloc": ({"MINIGPT_MALLOC": "default"}, "bf16"),
    "bf16 autocast, freed memory kept": ({}, "bf16"),
}


def measure(
    env: dict,
    threads: int,
    steps: int,
    workload: str,
    precision: str = "auto",
    method: str = "lora",
) -> float:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(threads), str(steps), workload, precision, method],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def speed_table(steps: int, workload: str, repeats: int = 3) -> None:
    """Idle tokens/s per precision and malloc setting: the best of ``repeats`` runs each,
    interleaved."""
    best = dict.fromkeys(SPEED_SETTINGS, 0.0)
    for _ in range(repeats):
        for name, (env, precision) in SPEED_SETTINGS.items():
            best[name] = max(best[name], measure(env, 0, steps, workload, precision))
    base = best["float32, glibc's default malloc"]
    print(f"| {workload} step, idle | tokens/s | speed-up |\n|---|---|---|")
    for name, value in best.items():
        print(f"| {name} | {value:,.0f} | {value / base:.2f}x |")


def pool_table(steps: int, workload: str, workers: int) -> None:
    """Idle tokens/s of one process with torch's default threads against ``workers`` processes of
    one thread each running at once (the fine-tuning lab's worker pool, minigpt.lab.pool), per
    method and precision."""
    methods = ("full", "lora", "dora") if workload == "finetune" else ("full",)
    print(
        f"| {workload} step | precision | one process, default threads | {workers} processes x 1 "
        "thread | "
        f"speed-up |\n|---|---|---|---|---|"
    )
    for method in methods:
        for precision in ("fp32", "bf16"):
            single = measure({}, 0, steps, workload, precision, method)
            jobs = [
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, "1", str(steps), workload, precision, method],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(workers)
            ]
            together = sum(float(job.communicate()[0].strip().splitlines()[-1]) for job in jobs)
            print(
                f"| {method} | {precision} | {single:,.0f} | {together:,.0f} | "
                f"{together / single:.2f}x |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--workload",
        choices=("pretrain", "finetune"),
        default="pretrain",
        help="the TINY recipe's step, or the lab's LoRA step (small batches: more sensitive)",
    )
    parser.add_argument(
        "--speed", action="store_true", help="idle cores only: float32/bf16 x malloc setting"
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=0,
        metavar="N",
        help="idle cores only: one process against N single-thread processes at once",
    )
    args = parser.parse_args()
    if args.pool < 0 or args.steps < 1:
        parser.error(
            f"--pool must be >= 0 and --steps >= 1, got --pool {args.pool} --steps {args.steps}"
        )
    if args.pool:
        return pool_table(args.steps, args.workload, args.pool)
    if args.speed:
        return speed_table(args.steps, args.workload)
    print("| setting | idle tokens/s | with a busy competitor | slowdown |\n|---|---|---|---|")
    for name, (env, threads) in SETTINGS.items():
        idle = measure(env, threads, args.steps, args.workload)
        competitor = subprocess.Popen(
            [sys.executable, "-c", WORKER, "0", "0", "pretrain"], stdout=subprocess.DEVNULL
        )
        try:
            time.sleep(3)  # let the competitor reach its training loop
            loaded = measure(env, threads, args.steps, args.workload)
        finally:
            competitor.kill()
            competitor.wait()
        print(f"| {name} | {idle:,.0f} | {loaded:,.0f} | {idle / loaded:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
