"""Every docstring example in the package runs and prints what it shows.

The examples are the first code a user copies; a wrong one is a bug. Modules whose
optional dependency is not installed (matplotlib for ``imtm.viz``) are skipped, naming it.
"""

import doctest
import importlib
import pkgutil

import pytest

import imtm

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(imtm.__path__, prefix="imtm.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "imtm":
            raise
        pytest.skip(f"{name} needs {err.name}, which is not installed")
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(module, name, module=module) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, (
        f"{result.failed} docstring example(s) of {name} failed (output above)"
    )
