"""minigpt: the shared package of the minigpt-lora course.

Each chapter notebook builds one piece; the piece lives here once so that later chapters import it.
Data flows one way: tokenizer -> data -> model -> train/generate -> lora -> pissa/dora -> compare.
"""

__version__ = "0.1.0"
