"""`deploy-staging` and `cleanup-staging` against a real temporary git repository (a bare `origin`, a clone whose
`main` holds the template at another version, a `stage/...` branch), a `kubectl` stand-in on PATH recording its
arguments and input, and a loopback HTTP server standing in for Sentry's API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from reformatters.common.names import fit, shorten
from reformatters.deploy.policy import violations
from reformatters.deploy.render import CRON_JOB_NAME_LIMIT, DATASET_LABEL, DeployError, dataset_manifests
from reformatters.deploy.staging import (
    STAGING_LABEL,
    STAGING_OFFSET_MINUTES,
    VERSION_LABEL,
    StagedVersion,
    StagingError,
    offset_schedule,
    template_in_repo,
)
from reformatters.monitoring import MAX_SLUG_LENGTH
from reformatters.registry import get_dataset
from tests.test_deploy import KUBECTL_STAND_IN, container, kubectl_calls

GFS = "noaa-gfs-forecast"
LONGEST = "ecmwf-ifs-ens-forecast-15-day-0-25-degree"  # the longest id of the datasets declared


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def write_template(clone: Path, dataset_id: str, version: str) -> None:
    path = clone / "templates" / dataset_id / "latest.zarr" / "zarr.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    attributes = {"dataset_id": dataset_id, "dataset_version": version}
    path.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A clone on `stage/noaa-gfs-forecast/v0.3.0` (template 0.3.0); main and origin hold 0.2.0; the longest id's
    template is 0.3.0 on the stage branch and absent on main (a new dataset)."""
    origin, clone = tmp_path / "origin.git", tmp_path / "clone"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    for key, value in (("user.name", "Test"), ("user.email", "test@example.org"), ("commit.gpgsign", "false")):
        git(clone, "config", key, value)
    git(clone, "checkout", "-q", "-b", "main")
    write_template(clone, GFS, "0.2.0")
    git(clone, "add", ".")
    git(clone, "commit", "-q", "-m", "primary")
    git(clone, "push", "-q", "origin", "main")
    git(clone, "checkout", "-q", "-b", f"stage/{GFS}/v0.3.0")
    write_template(clone, GFS, "0.3.0")
    write_template(clone, LONGEST, "0.3.0")
    git(clone, "add", ".")
    git(clone, "commit", "-q", "-m", "v0.3.0")
    git(clone, "push", "-q", "origin", f"stage/{GFS}/v0.3.0", f"HEAD:refs/heads/stage/{LONGEST}/v0.3.0")
    return clone


def run_cli(tmp_path: Path, cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "kubectl"
    stand_in.write_text(KUBECTL_STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("REFORMATTERS_IMAGE", "SENTRY_AUTH_TOKEN", "SENTRY_ORG")}
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # the stand-in before any real kubectl; git after
        "KUBECTL_RECORD": str(tmp_path / "kubectl.jsonl"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
        **extra,
    }
    return subprocess.run(
        [sys.executable, "-m", "reformatters.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def staging_args(dataset_id: str = GFS, version: str = "0.3.0") -> list[str]:
    return ["deploy-staging", "--dataset-id", dataset_id, "--version", version, "--docker-image", "r.example/x:abc1"]


def applied(tmp_path: Path) -> list[dict[str, Any]]:
    calls = kubectl_calls(tmp_path)
    assert [c["argv"] for c in calls] == [["apply", "-f", "-"]]
    return list(yaml.safe_load_all(calls[0]["stdin"]))


# ---- deploy-staging ----


def test_deploy_staging_applies_the_versions_cronjobs_with_staging_names_labels_offset_schedules_and_store(
    tmp_path: Path, repo: Path
) -> None:
    result = run_cli(tmp_path, repo, *staging_args())
    assert result.returncode == 0, result.stderr
    manifests = applied(tmp_path)
    primary = {m["metadata"]["name"]: m for m in dataset_manifests_of(GFS)}
    assert [m["metadata"]["name"] for m in manifests] == [
        "staging-noaa-gfs-forecast-v0-3-0-update",
        "staging-noaa-gfs-forecast-v0-3-0-validate",
    ]
    for manifest, component in zip(manifests, ("update", "validate"), strict=True):
        labels = manifest["metadata"]["labels"]
        assert labels[DATASET_LABEL] == GFS and labels[VERSION_LABEL] == "0.3.0" and labels[STAGING_LABEL] == "true"
        schedule = primary[f"{GFS}-{component}"]["spec"]["schedule"]
        assert manifest["spec"]["schedule"] == offset_schedule(schedule, STAGING_OFFSET_MINUTES) != schedule
        env = {e["name"]: e for e in container(manifest)["env"]}
        assert env["CRON_JOB_NAME"]["value"] == manifest["metadata"]["name"]
        assert env["CRON_SCHEDULE"]["value"] == manifest["spec"]["schedule"]  # the monitor expects the offset runs
        assert env["REFORMATTERS_STORE"]["value"] == "$(REFORMATTERS_STORE_BASE)/noaa-gfs-forecast/v0.3.0.zarr"
        assert env["REFORMATTERS_STORE_BASE"]["valueFrom"]["configMapKeyRef"]["key"] == "store-base"
        assert container(manifest)["image"] == "r.example/x:abc1"
        kubernetes_validate.validate(manifest, kubernetes_validate.utils.latest_version(), strict=True)
        assert violations(manifest) == []
    # GFS updates at 38 past 5, 11, 17, 23 h: the staged version 7 minutes later.
    assert manifests[0]["spec"]["schedule"] == "45 5,11,17,23 * * *"
    assert "staging-noaa-gfs-forecast-v0-3-0-update" in result.stdout and "cleanup-staging" in result.stdout


def dataset_manifests_of(dataset_id: str) -> list[dict[str, Any]]:
    return dataset_manifests(dataset_id, get_dataset(dataset_id).operational_resources(), "r.example/x:abc1")


@pytest.mark.parametrize(
    ("args", "prepare", "needles"),
    [
        (staging_args("no-such-dataset"), None, ["unknown dataset 'no-such-dataset'", "reformatters list"]),
        (
            staging_args(version="0.4.0"),
            None,
            ["--version 0.4.0 but HEAD:templates/noaa-gfs-forecast/latest.zarr/zarr.json has dataset_version 0.3.0"],
        ),
        (
            staging_args(version="0.2.0"),
            ["checkout", "-q", "main"],
            ["version 0.2.0 is already the version on main", "stage a new version"],
        ),
        (  # a shallow CI checkout: no local main, origin/main read instead
            staging_args(version="0.2.0"),
            ["checkout", "-q", "--detach", "main"],
            ["version 0.2.0 is already the version on origin/main"],
        ),
        (staging_args(version="v0.3.0"), None, ["without its 'v': --version 0.3.0"]),
    ],
    ids=["unknown-dataset", "not-the-template-version", "version-on-main", "version-on-origin-main", "v-prefix"],
)
def test_each_check_fails_in_one_line_that_says_the_fix_and_applies_nothing(
    tmp_path: Path, repo: Path, args: list[str], prepare: list[str] | None, needles: list[str]
) -> None:
    if prepare:
        git(repo, *prepare)
        if "--detach" in prepare:
            git(repo, "branch", "-q", "-D", "main")
    result = run_cli(tmp_path, repo, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert kubectl_calls(tmp_path) == []


def test_deploy_staging_outside_a_git_repository_says_so(tmp_path: Path) -> None:
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    result = run_cli(tmp_path, outside, *staging_args(), GIT_CEILING_DIRECTORIES=str(tmp_path))
    assert result.returncode == 2
    assert "is not inside a git repository; run this in a checkout" in result.stderr, result.stderr
    assert kubectl_calls(tmp_path) == []


def test_the_longest_dataset_id_yields_names_within_the_limits_and_its_identity_in_labels(
    tmp_path: Path, repo: Path
) -> None:
    result = run_cli(tmp_path, repo, *staging_args(LONGEST))
    assert result.returncode == 0, result.stderr
    manifests = applied(tmp_path)
    names = [m["metadata"]["name"] for m in manifests]
    full = [f"staging-{LONGEST}-v0-3-0-{c}" for c in ("update", "validate")]
    assert [len(n) for n in full] == [63, 65]  # what the convention alone would give
    assert all(len(n) <= CRON_JOB_NAME_LIMIT for n in names), names
    assert names[0].startswith("staging-ecmwf-ifs-ens") and names[0].endswith("-v0-3-0-update")
    assert names[1].startswith("staging-ecmwf-ifs-ens") and names[1].endswith("-v0-3-0-validate")
    assert names == [StagedVersion(dataset_id=LONGEST, version="0.3.0").name(c, 52) for c in ("update", "validate")]
    for manifest in manifests:
        labels = manifest["metadata"]["labels"]
        assert (labels[DATASET_LABEL], labels[VERSION_LABEL], labels[STAGING_LABEL]) == (LONGEST, "0.3.0", "true")
        kubernetes_validate.validate(manifest, kubernetes_validate.utils.latest_version(), strict=True)


# ---- names and schedules ----


def test_names_are_shortened_deterministically_keeping_prefix_version_and_kind() -> None:
    staged = StagedVersion(dataset_id=LONGEST, version="0.3.0")
    name = staged.name("validate", CRON_JOB_NAME_LIMIT)
    assert len(name) == CRON_JOB_NAME_LIMIT and name == staged.name("validate", CRON_JOB_NAME_LIMIT)
    assert name != StagedVersion(dataset_id=LONGEST, version="0.3.1").name("validate", CRON_JOB_NAME_LIMIT)
    other = StagedVersion(dataset_id=LONGEST.replace("15-day", "10-day"), version="0.3.0")
    assert other.name("validate", CRON_JOB_NAME_LIMIT) != name  # same cut, different hash
    gfs = StagedVersion(dataset_id=GFS, version="0.3.0")
    assert gfs.name("update", CRON_JOB_NAME_LIMIT) == "staging-noaa-gfs-forecast-v0-3-0-update"
    # The one implementation the monitor slugs use too.
    assert shorten("a" * 60, MAX_SLUG_LENGTH) == fit("", "a" * 60, "", MAX_SLUG_LENGTH)
    assert len(shorten("a" * 60, MAX_SLUG_LENGTH)) == MAX_SLUG_LENGTH
    with pytest.raises(ValueError, match="cannot be shortened"):
        fit("prefix-", "middle", "-a-suffix-far-too-long", 20)
    with pytest.raises(DeployError, match="pass the same dataset id"):
        dataset_manifests(GFS, get_dataset(GFS).operational_resources(), "r.example/x:abc1", staged)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("38 5,11,17,23 * * *", "45 5,11,17,23 * * *"),
        ("55 1,7,13,19 * * *", "2 2,8,14,20 * * *"),
        ("55 23 * * *", "2 0 * * *"),
        ("*/15 * * * *", "7,22,37,52 * * * *"),
        ("0 0-6/3 1 * *", "7 0,3,6 1 * *"),
    ],
)
def test_staging_schedules_run_minutes_after_the_primary(schedule: str, expected: str) -> None:
    assert offset_schedule(schedule, STAGING_OFFSET_MINUTES) == expected


def test_a_schedule_that_cannot_be_offset_is_refused_with_the_fix() -> None:
    with pytest.raises(StagingError, match="cross midnight"):
        offset_schedule("55 23 * * 1", STAGING_OFFSET_MINUTES)
    with pytest.raises(StagingError, match="minutes stay within the hour"):
        offset_schedule("0,55 6 * * *", STAGING_OFFSET_MINUTES)


def test_the_template_is_found_where_the_checkout_holds_it() -> None:
    root = Path(__file__).resolve().parents[1]
    template = get_dataset(GFS).template_config.template_path
    assert str(template_in_repo(template, root)) == "templates/noaa-gfs-forecast/latest.zarr/zarr.json"
    assert str(template_in_repo(template, Path("/elsewhere"))) == "templates/noaa-gfs-forecast/latest.zarr/zarr.json"


# ---- cleanup-staging ----


class SentryApiStandIn(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, str | None]] = []

    def do_DELETE(self) -> None:
        self.requests.append(("DELETE", self.path, self.headers.get("Authorization")))
        known = "/monitors/staging-noaa-gfs-forecast-v0-3-0-update/" in self.path
        self.send_response(202 if known else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def sentry_api() -> Iterator[tuple[str, list[tuple[str, str, str | None]]]]:
    requests: list[tuple[str, str, str | None]] = []
    handler = type("Handler", (SentryApiStandIn,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def origin_branches(repo: Path) -> list[str]:
    return sorted(line.split("refs/heads/")[1] for line in git(repo, "ls-remote", "--heads", "origin").splitlines())


def test_cleanup_deletes_the_cronjobs_the_monitors_and_the_branch_and_names_the_store(
    tmp_path: Path, repo: Path, sentry_api: tuple[str, list[tuple[str, str, str | None]]]
) -> None:
    url, requests = sentry_api
    assert f"stage/{GFS}/v0.3.0" in origin_branches(repo)
    result = run_cli(
        tmp_path,
        repo,
        "cleanup-staging",
        "--dataset-id",
        GFS,
        "--version",
        "0.3.0",
        "--store-base",
        "s3://bucket",
        SENTRY_AUTH_TOKEN="sntrys-token-123",
        SENTRY_ORG="dynamical",
        SENTRY_API_URL=url,
    )
    assert result.returncode == 0, result.stderr
    selector = f"{DATASET_LABEL}={GFS},{VERSION_LABEL}=0.3.0,{STAGING_LABEL}=true"
    assert [c["argv"] for c in kubectl_calls(tmp_path)] == [["delete", "cronjob", "-l", selector]]
    assert sorted(requests) == [
        ("DELETE", f"/api/0/organizations/dynamical/monitors/{slug}/", "Bearer sntrys-token-123")
        for slug in ("staging-noaa-gfs-forecast-v0-3-0-update", "staging-noaa-gfs-forecast-v0-3-0-validate")
    ]
    assert "deleted Sentry monitor staging-noaa-gfs-forecast-v0-3-0-update" in result.stdout
    assert "staging-noaa-gfs-forecast-v0-3-0-validate not found" in result.stdout
    assert origin_branches(repo) == ["main", f"stage/{LONGEST}/v0.3.0"]
    assert "left in place: the store s3://bucket/noaa-gfs-forecast/v0.3.0.zarr" in result.stdout


def test_cleanup_without_a_sentry_token_says_which_monitors_remain(
    tmp_path: Path, repo: Path, sentry_api: tuple[str, list[tuple[str, str, str | None]]]
) -> None:
    url, requests = sentry_api
    result = run_cli(
        tmp_path, repo, "cleanup-staging", "--dataset-id", LONGEST, "--version", "0.3.0", SENTRY_API_URL=url
    )
    assert result.returncode == 0, result.stderr
    staged = StagedVersion(dataset_id=LONGEST, version="0.3.0")
    slugs = [shorten(staged.name(c, CRON_JOB_NAME_LIMIT), MAX_SLUG_LENGTH) for c in ("update", "validate")]
    assert f"Sentry monitors remain: {', '.join(slugs)}" in result.stdout and requests == []
    assert kubectl_calls(tmp_path)[0]["argv"][:3] == ["delete", "cronjob", "-l"]
    assert origin_branches(repo) == ["main", f"stage/{GFS}/v0.3.0"]
    assert f"$STORE_BASE/{LONGEST}/v0.3.0.zarr" in result.stdout


# ---- the deploy-staging workflow ----

WORKFLOW = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "deploy-staging.yml"


@pytest.mark.parametrize(
    ("branch", "expected"),
    [
        (f"stage/{LONGEST}/v0.3.0", {"dataset_id": LONGEST, "version": "0.3.0"}),
        ("stage/noaa-gfs-forecast/v1.0.0-rc1", {"dataset_id": GFS, "version": "1.0.0-rc1"}),
        ("stage/noaa-gfs-forecast/0.3.0", None),
        ("stage/noaa-gfs-forecast", None),
    ],
)
def test_the_workflow_parses_dataset_and_version_from_the_branch(
    tmp_path: Path, branch: str, expected: dict[str, str] | None
) -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow[True]["push"]["branches"] == ["stage/**"]  # YAML 1.1 reads the key `on` as True
    assert workflow["concurrency"]["group"] == "deploy-staging-${{ github.ref }}"
    (parse,) = [step for step in workflow["jobs"]["branch"]["steps"] if step.get("id") == "parse"]
    output = tmp_path / "github_output"
    output.write_text("")
    result = subprocess.run(
        ["bash", "-c", parse["run"]],
        env={"BRANCH": branch, "GITHUB_OUTPUT": str(output), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
    )
    if expected is None:
        assert result.returncode != 0 and "is not stage/DATASET_ID/vVERSION" in result.stdout
        return
    assert result.returncode == 0, result.stdout + result.stderr
    assert dict(line.split("=", 1) for line in output.read_text().splitlines()) == expected
    run = workflow["jobs"]["deploy-staging"]["steps"][-1]["run"]
    assert 'deploy-staging \\\n  --dataset-id "$DATASET_ID" --version "$VERSION" --docker-image "$IMAGE"' in run
