"""The fine-tuning lab behind chapters 06-10: the course's pretrained base, runs, their cache, the
worker pool, reports with verdicts, and the benchmarks.

- :mod:`minigpt.lab.pretrained`: the pretraining recipe and the cached base model
  (:func:`get_pretrained`);
- :mod:`minigpt.lab.task`: the fine-tuning data (documentation + the word-reversal task) and
  measurements;
- :mod:`minigpt.lab.runs`: one run (:class:`RunSpec`, :func:`prepare_model`, :func:`finetune`);
- :mod:`minigpt.lab.lab`: :class:`Lab`, which caches runs and trains them in worker processes;
- :mod:`minigpt.lab.pool`: the worker processes;
- :mod:`minigpt.lab.report`: tables, mean ± std and the spread rule behind each verdict;
- :mod:`minigpt.lab.bench`: speed and memory against PEFT.

The lab may import the taught modules at the top of the package; they never import the lab.
"""

from minigpt.lab.lab import Lab
from minigpt.lab.pretrained import get_pretrained
from minigpt.lab.report import exceeds_spread, format_table, summarize
from minigpt.lab.runs import RunSpec

__all__ = ["Lab", "RunSpec", "exceeds_spread", "format_table", "get_pretrained", "summarize"]
