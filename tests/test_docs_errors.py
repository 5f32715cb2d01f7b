"""README's list of pyembed's SQLSTATEs ("Errors have their own SQLSTATEs: ...") names every
code pyembed.errors maps to a class, so a reader of the list can handle each one."""

from __future__ import annotations

import re

from pyembed import errors
from tests.conftest import REPO


def test_the_readme_lists_every_sqlstate_pyembed_raises() -> None:
    readme = (REPO / "README.md").read_text()
    start = readme.index("Errors have their own SQLSTATEs")
    paragraph = readme[start:readme.index("\n\n", start)]
    listed = set(re.findall(r"`(PE\d{3})`", paragraph))
    assert listed == set(errors._BY_SQLSTATE), sorted(set(errors._BY_SQLSTATE) ^ listed)


def test_the_readme_names_each_sqlstates_python_class() -> None:
    """Each code's stretch of that list, up to the next code, names the class pyembed raises for
    it, and the class is importable from `pyembed` as a reader would catch it."""
    import pyembed

    readme = (REPO / "README.md").read_text()
    start = readme.index("Errors have their own SQLSTATEs")
    paragraph = readme[start:readme.index("\n\n", start)]
    parts = re.split(r"`(PE\d{3})`", paragraph)[1:]
    stretches = dict(zip(parts[::2], parts[1::2], strict=True))
    for code, cls in errors._BY_SQLSTATE.items():
        assert re.search(rf"`(pyembed\.)?{cls.__name__}`", stretches[code]), (code, cls.__name__)
        assert getattr(pyembed, cls.__name__) is cls
