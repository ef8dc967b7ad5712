"""One site build per test session, shared by tests/test_site.py and tests/test_browser.py."""

import time
from pathlib import Path

_BUILT: dict[str, object] = {}


def built_site(tmp_path_factory) -> Path:
    """Build the course site once (about 20 s) and return its folder; later calls reuse it."""
    if "path" not in _BUILT:
        from minigpt.course.site import build_site

        out = tmp_path_factory.mktemp("site")
        start = time.perf_counter()
        build_site(out)
        _BUILT["seconds"] = time.perf_counter() - start
        _BUILT["path"] = out
        print(f"\nsite built in {_BUILT['seconds']:.1f} s")
    return _BUILT["path"]
