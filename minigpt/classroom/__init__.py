"""Classroom mode: student versions of the chapters and a grader for a whole class.

* :mod:`minigpt.classroom.student`: student versions, and the ``grade`` command line.
* :mod:`minigpt.classroom.grader`: the trusted side; every check runs there.
* :mod:`minigpt.classroom.worker`: the untrusted side; runs the notebook, and serves its objects.
* :mod:`minigpt.classroom.remote`: proxies through which a check talks to the worker's objects.
* :mod:`minigpt.classroom.wire`: framed messages under deadlines set by the grader.
* :mod:`minigpt.classroom.codec`: the plain data the worker's answers may hold.
* :mod:`minigpt.classroom.inputs`: what the grader accepts as a submission.
* :mod:`minigpt.classroom.report`: a grade as data and as text.
* :mod:`minigpt.classroom.gradebook`: many submissions in parallel, CSV and Gradescope results.
* :mod:`minigpt.classroom.sandbox`: isolation levels, limits and the audit hook.
* :mod:`minigpt.classroom.checks`: the chapter checks.

The classroom may import everything above it (the taught modules, the lab, the course tooling);
nothing imports the classroom.
"""
