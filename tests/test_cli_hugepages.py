"""The CLI's re-run with glibc malloc on transparent huge pages: when it applies, and that it
really runs (the environment of a real `contrastive-jax` process)."""
import os
import platform
import subprocess
import sys

import pytest

from contrastive_jax import cli


def _thp(tmp_path, mode):
    f = tmp_path / "enabled"
    f.write_text({"madvise": "always [madvise] never\n", "always": "[always] madvise never\n",
                  "never": "always madvise [never]\n"}[mode])
    return str(f)


def _glibc_at_least_2_35():
    lib, version = platform.libc_ver()
    return lib == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)


@pytest.mark.skipif(not _glibc_at_least_2_35(), reason="needs Linux with glibc >= 2.35 (the tunable's first release)")
def test_applies_only_to_compute_commands_in_madvise_mode(tmp_path):
    madvise = _thp(tmp_path, "madvise")
    env = cli._hugepage_malloc_env(["train", "--config", "c.py"], {"PATH": "/bin"}, platform="linux", thp_file=madvise)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # Other tunables are kept; an explicit hugetlb setting (either value) is the user's.
    env = cli._hugepage_malloc_env(["eval"], {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, platform="linux",
                                   thp_file=madvise)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    for argv, environ, mode, plat in (
            (["train"], {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", "linux"),
            (["train"], {cli.HUGEPAGES_ENV: "0"}, "madvise", "linux"),
            (["data", "convert"], {}, "madvise", "linux"),
            ([], {}, "madvise", "linux"),
            (["train"], {}, "always", "linux"),
            (["train"], {}, "never", "linux"),
            (["train"], {}, "madvise", "darwin")):
        assert cli._hugepage_malloc_env(argv, environ, platform=plat, thp_file=_thp(tmp_path, mode)) is None, (
            argv, environ, mode, plat)
    assert cli._hugepage_malloc_env(["train"], {}, platform="linux", thp_file=str(tmp_path / "absent")) is None


def _run_program(tmp_path, argv, argv0="contrastive-jax", **env):
    """Runs ``cli.main()`` as the program does (argv from sys.argv) with ``sys.executable`` a script
    that prints what it was exec'd with: the re-run's environment and arguments, observed."""
    wrapper = tmp_path / "python"
    wrapper.write_text('#!/bin/sh\necho "TUNABLES=$GLIBC_TUNABLES ARGS=$*"\n')
    wrapper.chmod(0o755)
    code = (f"import sys; from contrastive_jax import cli; sys.executable = {str(wrapper)!r}; "
            f"sys.argv = [{argv0!r}, *{argv!r}]; sys.exit(cli.main())")
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=120)
    return out.returncode, out.stdout


@pytest.mark.skipif(not (_glibc_at_least_2_35() and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
                         and "[madvise]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()),
                    reason="the re-run applies only on glibc >= 2.35 with transparent huge pages in madvise mode")
def test_the_program_reruns_itself_with_the_tunable_and_can_be_told_not_to(tmp_path):
    rc, out = _run_program(tmp_path, ["train", "-h"], **{cli.HUGEPAGES_ENV: "1"})
    assert rc == 0 and out.strip() == "TUNABLES=glibc.malloc.hugetlb=1 ARGS=-m contrastive_jax.cli train -h"
    # Opted out, or called with argv (a library caller's process is never replaced): no re-run.
    rc, out = _run_program(tmp_path, ["train", "-h"], **{cli.HUGEPAGES_ENV: "0"})
    assert rc == 0 and "TUNABLES=" not in out and "contrastive-jax train" in out
    # A program that wraps main() (patching something first, as the fault-injection tests do)
    # keeps its process: sys.argv[0] is not the contrastive-jax program.
    rc, out = _run_program(tmp_path, ["train", "-h"], argv0="wrapper.py", **{cli.HUGEPAGES_ENV: "1"})
    assert rc == 0 and "TUNABLES=" not in out and "contrastive-jax train" in out
    code = "from contrastive_jax import cli; import sys; sys.exit(cli.main(['train', '-h']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    assert out.returncode == 0 and "TUNABLES=" not in out.stdout and "contrastive-jax train" in out.stdout
