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
