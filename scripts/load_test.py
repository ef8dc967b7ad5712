"""How training throughput degrades when another busy process shares the CPU cores, per thread setting.

For each setting, the tiny model trains for ``--steps`` steps (tokens/s measured after a warm-up) once on
idle cores and once next to a competitor: a second process training the same model with torch's default
threads, as a second notebook or a second course run would. Run it on otherwise idle cores:

    python scripts/load_test.py --steps 30
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORKER = r"""
import os, sys, time, torch
import torch.nn.functional as F
from minigpt.model import GPTConfig, GPTModel
threads = int(sys.argv[1]); steps = int(sys.argv[2])
if threads > 0:
    torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = GPTConfig.from_preset("tiny")
model = GPTModel(cfg); opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, cfg.vocab_size, (64, cfg.context_length)); y = torch.randint(0, cfg.vocab_size, (64, cfg.context_length))
def step():
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()); opt.zero_grad(); loss.backward(); opt.step()
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
    "1 thread": ({"OMP_NUM_THREADS": "1"}, 1),
    "1 thread, PASSIVE": ({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}, 1),
}


def measure(env: dict, threads: int, steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(steps)], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"| setting | idle tokens/s | with a busy competitor | slowdown |\n|---|---|---|---|")
    for name, (env, threads) in SETTINGS.items():
        idle = measure(env, threads, args.steps)
        competitor = subprocess.Popen([sys.executable, "-c", WORKER, "0", "0"], stdout=subprocess.DEVNULL)
        try:
            time.sleep(3)  # let the competitor reach its training loop
            loaded = measure(env, threads, args.steps)
        finally:
            competitor.kill()
            competitor.wait()
        print(f"| {name} | {idle:,.0f} | {loaded:,.0f} | {idle / loaded:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
