"""Runs transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, and `GenerationTesterMixin` when a
source checkout is given) against InfiMM, and prints what passed, failed and was skipped, failures grouped by cause.

The common test files are not part of this project. They come from the source distribution of the INSTALLED
transformers release (its `tests/` holds `test_modeling_common.py` and `test_configuration_common.py`), downloaded
once with pip into a cache folder; later runs work offline. The sdist lacks three modules those files import
(`tests/generation/test_utils.py`, `tests/exporters/test_export.py`, `tests/utils/test_configuration_utils.py`);
the runner writes empty stand-ins for them into the cache, so the generation and export tests do not run unless
`--transformers-src` points at a checkout of the matching transformers tag, whose `tests/` is then used whole.

    python scripts/transformers_common/run.py                      # download (first run) and run everything
    python scripts/transformers_common/run.py -k "save or embeds"  # a subset, pytest's -k syntax
    python scripts/transformers_common/run.py --sdist transformers-5.24.0.tar.gz   # seed the cache from a file
    python scripts/transformers_common/run.py --transformers-src ~/src/transformers  # with generation tests
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TESTER = HERE / "infimm_common_tester.py"
# The tester module finds the common tests' package through this variable (a folder that holds `tests/`).
TESTS_ROOT_ENV = "INFIMM_TRANSFORMERS_TESTS_ROOT"
CACHE_ENV = "INFIMM_TRANSFORMERS_TESTS_CACHE"

# Stand-ins for the modules the sdist's common test files import but the sdist does not ship.
STUBS = {
    "__init__.py": "",
    "generation/__init__.py": "",
    "generation/test_utils.py": '''
        """Stand-in: the sdist has no generation tests. Pass --transformers-src to run the real ones."""

        STUB = True


        class GenerationTesterMixin:
            pass
    ''',
    "exporters/__init__.py": "",
    "exporters/test_export.py": '''
        """Stand-in: the sdist has no export tests (`torch.export`); the real mixin comes with --transformers-src."""

        STUB = True


        class ExportTesterMixin:
            pass
    ''',
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": '''
        """Stand-in. `ConfigTester.check_config_arguments_init` reads `config_common_kwargs` only for configs without
        sub-configs; InfiMM's config has two, so the check returns before it looks at this dict."""

        STUB = True
        config_common_kwargs = {}
    ''',
}


def installed_transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "infimm" / "transformers-tests"


def _sdist_version(sdist: Path) -> str | None:
    """The `Version:` of an sdist's PKG-INFO (None when it has none)."""
    if sdist.is_dir():
        info = sdist / "PKG-INFO"
        text = info.read_text(errors="replace") if info.is_file() else ""
    else:
        with tarfile.open(sdist) as archive:
            member = next((m for m in archive.getmembers() if re.fullmatch(r"[^/]+/PKG-INFO", m.name)), None)
            text = archive.extractfile(member).read().decode(errors="replace") if member is not None else ""
    found = re.search(r"^Version: (\S+)", text, re.MULTILINE)
    return found.group(1) if found else None


def _extract_tests(sdist: Path, version: str, target: Path):
    """Copies the `tests/` folder of an sdist (a `.tar.gz`, or an unpacked folder) into `target/tests`."""
    found = _sdist_version(sdist)
    if found != version:
        raise SystemExit(
            f"{sdist} is the sdist of transformers {found or '(unknown version)'}, but {version} is installed; the "
            "common tests must match the library. Pass the matching sdist, or leave --sdist out to download it."
        )
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        if sdist.is_dir():
            source = sdist / "tests"
            if not (source / "test_modeling_common.py").is_file():
                raise SystemExit(f"{sdist} is not an unpacked transformers sdist: no tests/test_modeling_common.py.")
            shutil.copytree(source, tmp / "tests")
        else:
            with tarfile.open(sdist) as archive:
                members = [m for m in archive.getmembers() if re.match(r"^[^/]+/tests/", m.name) and m.isfile()]
                if not members:
                    raise SystemExit(f"{sdist} holds no tests/ folder; is it the transformers sdist?")
                for member in members:
                    member.name = member.name.split("/", 1)[1]
                    archive.extract(member, tmp, filter="data")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    (target / "VERSION").write_text(version + "\n")


def _download_sdist(version: str, into: Path) -> Path:
    """The registry's sdist of this transformers version, through pip (the only network access of the runner)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"transformers=={version}", "-d", str(into)]
    print(f"Downloading the transformers {version} sdist: {' '.join(command)}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    archives = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if result.returncode != 0 or not archives:
        raise SystemExit(
            f"Could not download the transformers {version} sdist (pip exit code {result.returncode}):\n"
            f"{result.stderr.strip()}\nWithout network, pass a copy with --sdist PATH (the .tar.gz or the unpacked "
            "folder)."
        )
    return archives[0]


def locate_tests(cache_dir: Path, version: str, sdist: Path | None, refresh: bool) -> Path:
    """The folder holding the cached `tests/` package of this transformers version (downloaded if missing)."""
    target = cache_dir / f"transformers-{version}"
    ready = (target / "tests" / "test_modeling_common.py").is_file() and (target / "VERSION").is_file()
    if refresh or not ready or sdist is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if sdist is None:
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                _extract_tests(_download_sdist(version, Path(tmp)), version, target)
        else:
            _extract_tests(sdist.expanduser().resolve(), version, target)
    for name, text in STUBS.items():
        path = target / "tests" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text).lstrip())
    return target


def source_checkout_tests(src: Path, installed: str) -> Path:
    """A transformers checkout's root, whose `tests/` (generation tests included) is used as it is."""
    src = src.expanduser().resolve()
    if not (src / "tests" / "generation" / "test_utils.py").is_file():
        raise SystemExit(f"{src} is not a transformers source checkout: no tests/generation/test_utils.py.")
    init = src / "src" / "transformers" / "__init__.py"
    found = re.search(r'__version__ = "([^"]+)"', init.read_text()) if init.is_file() else None
    if found is None or found.group(1) != installed:
        print(
            f"WARNING: the checkout is transformers {found.group(1) if found else 'of unknown version'}, the installed "
            f"release is {installed}; check out tag v{installed} so that the tests match the library.",
            flush=True,
        )
    if not (src / "tests" / "__init__.py").is_file():
        raise SystemExit(f"{src}/tests has no __init__.py; is it a transformers checkout?")
    return src


# ------------------------------------------------------------------------------------------------------ reporting
_RANK = {"passed": 0, "skipped": 1, "failed": 2}


class _Collector:
    """pytest plugin: one outcome per test (setup errors and call failures both count as failed)."""

    def __init__(self):
        self.outcomes = {}  # test name -> (outcome, message)

    def pytest_runtest_logreport(self, report):
        # Subtests report under their test's name; the test's outcome is its worst: failed > skipped > passed.
        name = report.nodeid.split("::")[-1]
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if report.failed:
                outcome = ("failed", _failure_message(report))
            elif report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                outcome = ("skipped", reason.removeprefix("Skipped: "))
            else:
                outcome = ("passed", "")
            previous = self.outcomes.get(name)
            if previous is None or _RANK[outcome[0]] > _RANK[previous[0]]:
                self.outcomes[name] = outcome


def _failure_message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
    return message.strip()


def _signature(message: str) -> str:
    """Failures with the same exception and first message line, up to numbers and shapes, share a cause."""
    first = message.splitlines()[0] if message else "(no message)"
    first = re.sub(r"0x[0-9a-f]+", "0x…", first)
    first = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", first)
    return first[:220]


def _diagnosis(name: str, diagnoses: dict) -> str | None:
    for prefix, text in diagnoses.items():
        if name == prefix or name.startswith(prefix + "_"):
            return text
    return None


def print_summary(outcomes: dict, diagnoses: dict, elapsed: float):
    counts = collections.Counter(outcome for outcome, _ in outcomes.values())
    width = 78
    print("\n" + "=" * width)
    print(f"InfiMM against transformers' common tests: {len(outcomes)} tests in {elapsed:.0f} s")
    print("-" * width)
    print(f"| {'outcome':<10} | {'tests':>6} |")
    print(f"|{'-' * 12}|{'-' * 8}|")
    for outcome in ("passed", "failed", "skipped"):
        print(f"| {outcome:<10} | {counts.get(outcome, 0):>6} |")

    failed = {name: message for name, (outcome, message) in outcomes.items() if outcome == "failed"}
    if failed:
        print("\nFailures, grouped by cause:")
        groups = collections.defaultdict(list)
        for name, message in sorted(failed.items()):
            groups[_diagnosis(name, diagnoses) or _signature(message)].append((name, message))
        for number, (cause, members) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1])), 1):
            print(f"\n  [{number}] {len(members)} test(s): {textwrap.shorten(cause, 300)}")
            for name, message in members:
                print(f"      - {name}: {textwrap.shorten(message, 160)}")

    skipped = collections.defaultdict(list)
    for name, (outcome, reason) in outcomes.items():
        if outcome == "skipped":
            skipped[reason.strip() or "(no reason given)"].append(name)
    if skipped:
        print("\nSkipped, grouped by reason:")
        for reason, names in sorted(skipped.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(sorted(names)[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
            print(f"  - {len(names)}: {textwrap.shorten(reason, 200)}\n      {shown}")
    print("=" * width)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where the sdist's tests/ are kept (default: ${CACHE_ENV} or ~/.cache/infimm/transformers-tests)")
    parser.add_argument("--sdist", type=Path, default=None,
                        help="a local transformers sdist (.tar.gz or unpacked folder) of the installed version, instead of downloading")
    parser.add_argument("--refresh", action="store_true", help="download the sdist again")
    parser.add_argument("--transformers-src", type=Path, default=None,
                        help="a transformers source checkout (tag of the installed version); its tests/ brings GenerationTesterMixin")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression selecting tests")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models)")
    parser.add_argument("--slow", action="store_true", help="also the tests transformers marks @slow (RUN_SLOW=1)")
    parser.add_argument("pytest_args", nargs="*", help="further pytest arguments (after --)")
    args = parser.parse_args(argv)

    version = installed_transformers_version()
    if args.transformers_src is not None:
        root = source_checkout_tests(args.transformers_src, version)
        origin = f"source checkout {root}"
    else:
        root = locate_tests((args.cache_dir or default_cache_dir()).expanduser(), version, args.sdist, args.refresh)
        origin = f"sdist tests cached in {root}"
    print(f"transformers {version}; common tests from the {origin}", flush=True)

    try:
        import parameterized  # noqa: F401  (the common test files import it)
    except ImportError:
        raise SystemExit("transformers' common tests need the `parameterized` package: pip install parameterized")
    import pytest

    os.environ[TESTS_ROOT_ENV] = str(root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["INFIMM_COMMON_TESTS_THREADS"] = str(args.threads)
    if args.slow:
        os.environ["RUN_SLOW"] = "1"  # read by transformers.testing_utils when it is first imported, just below
    sys.path.insert(0, str(HERE))
    import infimm
    from infimm_common_tester import DIAGNOSES

    print(f"infimm from {Path(infimm.__file__).parent}", flush=True)

    pytest_args = [str(TESTER), "-q", "-p", "no:cacheprovider", "--rootdir", str(HERE), "-o", "addopts=",
                   "-W", "ignore::pytest.PytestUnknownMarkWarning", "--tb=short", *args.pytest_args]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    collector = _Collector()
    start = time.perf_counter()
    code = pytest.main(pytest_args, plugins=[collector])
    print_summary(collector.outcomes, DIAGNOSES, time.perf_counter() - start)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
