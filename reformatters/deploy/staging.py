"""Staging a new dataset version beside the primary: names, labels, schedules and store of its CronJobs, the
checks `deploy-staging` makes against the git checkout, and what `cleanup-staging` removes.

Conventions: branch `stage/{dataset_id}/v{version}`; CronJobs `staging-{dataset_id}-v{version, dots as
dashes}-{update|validate}` (shortened to fit, the full identity in labels); store
`{store base}/{dataset_id}/v{version}.zarr`; schedules `STAGING_OFFSET_MINUTES` after the primary's.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, field_validator

from reformatters.common.names import fit

STAGING_PREFIX = "staging-"
STAGING_OFFSET_MINUTES = 7
COMPONENTS = ("update", "validate")
VERSION_LABEL = "reformatters.dynamical.org/version"
STAGING_LABEL = "reformatters.dynamical.org/staging"
# The ConfigMap key holding the stores' common base (s3://BUCKET); a staged version's store lies under it.
STORE_BASE_KEY = "store-base"
STORE_BASE_ENV = "REFORMATTERS_STORE_BASE"
TEMPLATES_IN_REPO = PurePosixPath("templates")
MAIN_REFS = ("main", "origin/main")
SENTRY_API_URL_ENV = "SENTRY_API_URL"
DEFAULT_SENTRY_API_URL = "https://sentry.io"

_VERSION = re.compile(r"[0-9a-z]([0-9a-z.-]{0,40}[0-9a-z])?")


class StagingError(ValueError):
    """A staging step cannot proceed; the message says what was expected, what was found and what to do."""


class StagedVersion(BaseModel):
    """One dataset version staged beside the primary."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset_id: str
    version: str

    @field_validator("version")
    @classmethod
    def _plain_version(cls, value: str) -> str:
        if value.startswith("v") and _VERSION.fullmatch(value[1:]):
            raise ValueError(f"give the version without its 'v': --version {value[1:]}")
        if not _VERSION.fullmatch(value):
            raise ValueError(
                f"version {value!r} must be digits, lowercase letters, '.' and '-' (such as 0.3.0), "
                "as the template's dataset_version"
            )
        return value

    @property
    def branch(self) -> str:
        return f"stage/{self.dataset_id}/v{self.version}"

    def full_name(self, component: str) -> str:
        return f"{STAGING_PREFIX}{self.dataset_id}-v{self.version.replace('.', '-')}-{component}"

    def name(self, component: str, limit: int) -> str:
        """The CronJob's name: `full_name` if it fits `limit`, else with the dataset id cut and a hash added."""
        suffix = f"-v{self.version.replace('.', '-')}-{component}"
        return fit(STAGING_PREFIX, self.dataset_id, suffix, limit)

    def labels(self) -> dict[str, str]:
        return {VERSION_LABEL: self.version, STAGING_LABEL: "true"}

    def selector(self, dataset_label: str) -> str:
        return ",".join(f"{k}={v}" for k, v in {dataset_label: self.dataset_id, **self.labels()}.items())

    def store(self, base: str) -> str:
        return f"{base.rstrip('/')}/{self.dataset_id}/v{self.version}.zarr"

    def schedule(self, primary: str) -> str:
        return offset_schedule(primary, STAGING_OFFSET_MINUTES)


# ---- schedules ----


def _expand(field: str, low: int, high: int) -> list[int]:
    """The values a cron field (`*`, `5`, `1-4`, `*/15`, `0-30/10`, comma lists of these) selects."""
    values: set[int] = set()
    for part in field.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, stop = low, high
        elif "-" in base:
            start, stop = (int(x) for x in base.split("-", 1))
        else:
            start = int(base)
            stop = high if step_text else start
        if not (low <= start <= stop <= high) or step < 1:
            raise ValueError(f"cron field {field!r} selects values outside {low}-{high}")
        values.update(range(start, stop + 1, step))
    return sorted(values)


def _join(values: list[int], low: int, high: int) -> str:
    return "*" if values == list(range(low, high + 1)) else ",".join(str(v) for v in values)


def offset_schedule(schedule: str, minutes: int) -> str:
    """A five-field cron schedule run `minutes` later (hours carried; minutes and hours as explicit lists)."""
    minute, hour, *days = schedule.split()
    try:
        times = [h * 60 + m + minutes for h in _expand(hour, 0, 23) for m in _expand(minute, 0, 59)]
    except ValueError as error:
        raise StagingError(f"schedule {schedule!r} cannot be offset: {error}; use numbers, ranges, */N") from None
    if any(t >= 24 * 60 for t in times) and days != ["*", "*", "*"]:
        raise StagingError(
            f"schedule {schedule!r} offset by {minutes} minutes would cross midnight into another day of a "
            "day-restricted schedule; move the primary's schedule away from midnight"
        )
    shifted = {t % (24 * 60) for t in times}
    new_minutes = sorted({t % 60 for t in shifted})
    new_hours = sorted({t // 60 for t in shifted})
    if {h * 60 + m for h in new_hours for m in new_minutes} != shifted:
        raise StagingError(
            f"schedule {schedule!r} offset by {minutes} minutes is no longer one minute list times one hour "
            "list; give the primary a schedule whose minutes stay within the hour"
        )
    return " ".join([_join(new_minutes, 0, 59), _join(new_hours, 0, 23), *days])


# ---- the git checkout ----


def git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)


def repo_root(path: Path) -> Path:
    try:
        found = git(path, "rev-parse", "--show-toplevel")
    except FileNotFoundError:
        raise StagingError("git not found on PATH; install git (staging reads the checkout's templates)") from None
    if found.returncode != 0:
        raise StagingError(
            f"{path} is not inside a git repository; run this in a checkout of the project (or pass --repo PATH)"
        )
    return Path(found.stdout.strip())


def template_in_repo(template_path: Path, root: Path) -> PurePosixPath:
    """The template's zarr.json relative to the repository root: where the dataset's template lies if that is
    inside the checkout, else the project's layout `templates/DATASET_ID/latest.zarr/zarr.json`."""
    zarr_json = template_path / "zarr.json"
    try:
        return PurePosixPath(zarr_json.resolve().relative_to(root.resolve()).as_posix())
    except ValueError:
        return TEMPLATES_IN_REPO / template_path.parent.name / template_path.name / "zarr.json"


def version_at(root: Path, ref: str, path: PurePosixPath) -> str | None:
    """`dataset_version` of the template at `ref`; None if the file is not there."""
    shown = git(root, "show", f"{ref}:{path}")
    if shown.returncode != 0:
        return None
    try:
        version = json.loads(shown.stdout)["attributes"]["dataset_version"]
    except (ValueError, KeyError, TypeError):
        raise StagingError(
            f"{ref}:{path} has no attributes.dataset_version; regenerate it with `reformatters update-template`"
        ) from None
    return str(version)


def main_version(root: Path, path: PurePosixPath) -> tuple[str, str | None]:
    """(ref, dataset_version on it) for `main`, else `origin/main` (a shallow CI checkout has only that)."""
    for ref in MAIN_REFS:
        if git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode == 0:
            return ref, version_at(root, ref, path)
    raise StagingError(
        f"neither main nor origin/main exists in {root}; fetch it: git fetch origin main:refs/remotes/origin/main"
    )


def check_versions(staged: StagedVersion, root: Path, path: PurePosixPath) -> None:
    """The checkout's template says `staged.version`, and main's says something else (or has no template)."""
    here = version_at(root, "HEAD", path)
    if here != staged.version:
        found = f"dataset_version {here}" if here is not None else "no such file"
        raise StagingError(
            f"--version {staged.version} but HEAD:{path} has {found}; set dataset_version to {staged.version} in "
            f"the dataset's code, run `reformatters update-template {staged.dataset_id}` and commit, or stage "
            f"the version the template has"
        )
    ref, on_main = main_version(root, path)
    if on_main == staged.version:
        raise StagingError(
            f"version {staged.version} is already the version on {ref} ({ref}:{path}): the primary CronJobs run "
            f"it; stage a new version: bump dataset_version, run `reformatters update-template "
            f"{staged.dataset_id}`, commit and push stage/{staged.dataset_id}/vNEW"
        )


def delete_branch(root: Path, branch: str) -> str:
    """Delete the branch on origin; a line saying what happened."""
    pushed = git(root, "push", "origin", "--delete", branch)
    if pushed.returncode == 0:
        return f"deleted branch {branch} on origin"
    if "remote ref does not exist" in pushed.stderr:
        return f"branch {branch} was not on origin (already deleted)"
    raise StagingError(
        f"git push origin --delete {branch} failed: {' '.join(pushed.stderr.split())}; delete the branch by hand"
    )


# ---- Sentry monitors ----


@dataclass(frozen=True)
class SentryApi:
    base_url: str
    organization: str
    token: str

    def delete_monitor(self, slug: str) -> str:
        """DELETE the cron monitor; a line saying what happened (404: it never checked in, or is gone)."""
        url = f"{self.base_url.rstrip('/')}/api/0/organizations/{self.organization}/monitors/{slug}/"
        request = urllib.request.Request(url, method="DELETE", headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return f"Sentry monitor {slug} not found (never checked in, or already deleted)"
            raise StagingError(
                f"Sentry refused deleting monitor {slug} (HTTP {error.code}); check SENTRY_AUTH_TOKEN's scopes "
                "(alerts:write) and SENTRY_ORG, or delete it in Sentry's Crons page"
            ) from None
        except urllib.error.URLError as error:
            raise StagingError(
                f"Sentry API at {self.base_url} unreachable ({error.reason}); set {SENTRY_API_URL_ENV} for a "
                "self-hosted Sentry, or delete the monitor in Sentry's Crons page"
            ) from None
        return f"deleted Sentry monitor {slug} (HTTP {status})"


def sentry_api(environ: Mapping[str, str]) -> SentryApi | None:
    token, organization = environ.get("SENTRY_AUTH_TOKEN"), environ.get("SENTRY_ORG")
    if not token or not organization:
        return None
    return SentryApi(environ.get(SENTRY_API_URL_ENV) or DEFAULT_SENTRY_API_URL, organization, token)
