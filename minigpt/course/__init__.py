"""The chapters as files: their numbers and paths, importing a notebook's definitions, the
single-source check (:mod:`minigpt.course.source`), execution with progress
(:mod:`minigpt.course.execute`), output cleaning (:mod:`minigpt.course.clean`), the Colab cells
(:mod:`minigpt.course.colab`) and the static site (:mod:`minigpt.course.site`).

The course tooling may import the taught modules and the lab; the taught modules never import it.
"""
