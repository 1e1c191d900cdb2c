"""infra/k8s and infra/schedule are valid as written, checked offline (no cluster, no network).

Built-in kinds against the Kubernetes OpenAPI schemas kubernetes-validate bundles; KubeRay kinds
against the CRDs vendored in infra/k8s/crds; systemd units with systemd-analyze where it exists.
"""

from __future__ import annotations

import configparser
import copy
import functools
import re
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "infra" / "k8s"
SCHEDULE = REPO / "infra" / "schedule"
# A release current clusters run; kubernetes-validate bundles its schemas.
KUBERNETES = "1.33"
PIPELINE_RUN = "python -m pipelines run pipelines/configs/nightly.yaml"
NIGHTLY = "python -m jobs.nightly pipelines/configs/nightly.yaml"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML


def load_all(path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc]


def manifests() -> dict[str, dict]:
    """Every object in infra/k8s/*.yaml by "file:Kind/name", with the RayJob a ConfigMap carries."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for obj in load_all(path):
            meta = obj["metadata"]
            key = f"{path.name}:{obj['kind']}/{meta.get('name') or meta['generateName']}"
            found[key] = obj
            for item, text in (obj.get("data") or {}).items() if obj["kind"] == "ConfigMap" else ():
                embedded = yaml.safe_load(text)
                if isinstance(embedded, dict) and "apiVersion" in embedded:
                    found[f"{key}/{item}"] = embedded
    return found


MANIFESTS = manifests()
BUILTIN = sorted(key for key, obj in MANIFESTS.items() if not obj["apiVersion"].startswith("ray.io/"))
KUBERAY = sorted(key for key, obj in MANIFESTS.items() if obj["apiVersion"].startswith("ray.io/"))


def one(kind: str, file: str | None = None, name: str | None = None) -> dict:
    """The one object of this kind (in this file, of this name)."""
    matches = [
        obj
        for key, obj in MANIFESTS.items()
        if obj["kind"] == kind
        and (file is None or key.startswith(file + ":"))
        and (name is None or obj["metadata"].get("name") == name)
    ]
    assert len(matches) == 1, (kind, file, name, len(matches))
    return matches[0]


def closed(schema):
    """The CRD's schema as the API server applies it to `kubectl apply` (strict field validation).

    A structural schema leaves an object open only where it says so (no properties, or
    x-kubernetes-preserve-unknown-fields); elsewhere an unknown field is an error, which plain
    JSON Schema would accept. `nullable` is OpenAPI's; x-kubernetes-int-or-string comes with an
    anyOf of integer and string, which jsonschema checks as it is; other x-kubernetes-* keys (CEL
    rules, list types) are the server's to enforce and are ignored here.
    """
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str, version: str) -> jsonschema.Validator:
    for path in sorted((K8S / "crds").glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=Loader)
        if crd["spec"]["names"]["kind"] == kind:
            served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
            schema = closed(served[version]["schema"]["openAPIV3Schema"])
            jsonschema.Draft4Validator.check_schema(schema)
            return jsonschema.Draft4Validator(schema)
    raise LookupError(f"no vendored CRD for {kind}")


def validate_kuberay(obj: dict) -> None:
    group, version = obj["apiVersion"].split("/")
    assert group == "ray.io"
    crd_validator(obj["kind"], version).validate(obj)


@pytest.mark.parametrize("key", BUILTIN)
def test_builtin_kind_matches_the_kubernetes_schema(key):
    kubernetes_validate.validate(MANIFESTS[key], KUBERNETES, strict=True)


@pytest.mark.parametrize("key", KUBERAY)
def test_kuberay_kind_matches_the_vendored_crd(key):
    validate_kuberay(MANIFESTS[key])


def _typo(obj):
    obj["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"


def _bad_type(obj):
    obj["spec"]["replicas"] = "one"


@pytest.mark.parametrize("breakage", [_typo, _bad_type])
def test_a_broken_builtin_is_rejected(breakage):
    deployment = copy.deepcopy(one("Deployment", "mlflow.yaml"))
    kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    breakage(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "backoffLimit"), "two"),  # a wrong type
        (("spec", "entrypiont"), PIPELINE_RUN),  # a typo: the server would reject it, not drop it
        (("spec", "shutdownAfterJobFinishes"), "yes"),  # a string for a boolean
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), "8"),  # a wrong type, deep
    ],
    ids=["wrong-type", "typo", "string-for-boolean", "wrong-type-deep"],
)
def test_a_broken_rayjob_is_rejected(path, value):
    rayjob = copy.deepcopy(one("RayJob", "rayjob.yaml"))
    target = rayjob
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_kuberay(rayjob)


def nightly_rayjobs() -> list[dict]:
    return [one("RayCronJob")["spec"]["jobTemplate"], one("RayJob", "nightly-cronjob.yaml")["spec"]]


def test_the_rayjob_runs_the_pipeline_and_retries():
    spec = one("RayJob", "rayjob.yaml")["spec"]
    assert spec["entrypoint"].endswith(PIPELINE_RUN)
    assert spec["backoffLimit"] >= 1
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("spec", nightly_rayjobs(), ids=["raycronjob", "cronjob-configmap"])
def test_the_nightly_rayjobs_run_the_nightly(spec):
    assert spec["entrypoint"].endswith(NIGHTLY)
    assert spec["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] < 24 * 3600  # over before the next night's run


def test_every_rayjob_runs_on_one_cluster_spec_and_environment():
    specs = [one("RayJob", "rayjob.yaml")["spec"], *nightly_rayjobs()]
    assert all(spec["rayClusterSpec"] == specs[0]["rayClusterSpec"] for spec in specs)
    assert all(spec["runtimeEnvYAML"] == specs[0]["runtimeEnvYAML"] for spec in specs)


def test_the_jobs_reach_mlflow_and_train_on_gpus():
    spec = one("RayJob", "rayjob.yaml")["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    service = one("Service", "mlflow.yaml", "mlflow")["spec"]
    assert service["type"] == "ClusterIP" and service["ports"][0]["port"] == 5000
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow.{namespace}.svc:5000"
    # pipelines/env.py picks "cpu" on the GPU-less head and hands it to the workers unless the job sets it.
    assert env["DS_ACCELERATOR"] == "cuda"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_the_cronjob_forbids_overlap_and_creates_the_configmaps_rayjob():
    cronjob = one("CronJob")["spec"]
    assert cronjob["concurrencyPolicy"] == "Forbid"
    assert cronjob["schedule"] == one("RayCronJob")["spec"]["schedule"]
    pod = cronjob["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:3] == ["kubectl", "create", "-f"]  # create: apply cannot generate names
    mount = pod["containers"][0]["volumeMounts"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = one("ConfigMap", "nightly-cronjob.yaml")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    key = command[3].removeprefix(mount["mountPath"] + "/")
    assert yaml.safe_load(configmap["data"][key])["metadata"]["generateName"]
    # The pod's ServiceAccount may create RayJobs, through the RoleBinding.
    role, binding = one("Role"), one("RoleBinding")
    assert any(
        "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
        for rule in role["rules"]
    )
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"]} in binding["subjects"]
    assert one("ServiceAccount")["metadata"]["name"] == pod["serviceAccountName"]


def test_mlflow_keeps_runs_in_postgres_and_artifacts_in_the_object_store():
    container = one("Deployment", "mlflow.yaml")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item for item in container["env"]}
    ref = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    secret = one("Secret", "mlflow.yaml", ref["name"])
    uri = secret["stringData"][ref["key"]]
    assert uri.startswith("postgresql://")
    host = re.search(r"@([\w.-]+):5432/", uri)[1]
    assert host == one("StatefulSet")["spec"]["serviceName"]
    assert one("Service", "mlflow.yaml", host)["spec"]["ports"][0]["port"] == 5432
    args = container["command"]
    assert "--serve-artifacts" in args
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in args)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_every_secret_and_configmap_referenced_is_shipped():
    shipped = {(obj["kind"], obj["metadata"].get("name")) for obj in MANIFESTS.values()}
    text = "\n".join(yaml.safe_dump(obj) for obj in MANIFESTS.values())
    refs = {("Secret", name) for name in re.findall(r"secret(?:Key)?Ref:\n\s+(?:key: \S+\n\s+)?name: (\S+)", text)}
    refs |= {("ConfigMap", name) for name in re.findall(r"configMap:\n\s+name: (\S+)", text)}
    assert ("Secret", "crossmodal-s3") in refs
    assert refs <= shipped, refs - shipped


def test_the_kustomization_lists_files_that_exist():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["resources"]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    # One nightly scheduler: the CronJob or the RayCronJob, never both.
    assert not {"nightly-cronjob.yaml", "raycronjob.yaml"} <= set(kustomization["resources"])


# infra/schedule


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((SCHEDULE / name).read_text())
    return parser


def test_the_service_runs_the_nightly_once_into_the_journal():
    service = unit("crossmodal-nightly.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["ExecStart"].endswith("/.venv/bin/" + NIGHTLY)
    assert service["EnvironmentFile"]
    assert service["StandardOutput"] == "journal"
    assert service["TimeoutStartSec"]
    example = (SCHEDULE / "nightly.env.example").read_text()
    assert re.search(r"^RAY_ADDRESS=\S", example, re.M) and re.search(r"^MLFLOW_TRACKING_URI=\S", example, re.M)


def test_the_timer_fires_nightly_and_catches_up():
    timer = unit("crossmodal-nightly.timer")["Timer"]
    assert timer["OnCalendar"] and timer["RandomizedDelaySec"]
    assert timer["Persistent"] == "true"
    assert timer["Unit"] == "crossmodal-nightly.service"
    assert unit("crossmodal-nightly.timer")["Install"]["WantedBy"] == "timers.target"


def verify(tmp_path, files: dict[str, str]) -> subprocess.CompletedProcess:
    """systemd-analyze verify on copies whose /opt/crossmodal is a folder here with a python in it.

    verify needs ExecStart's binary to exist; it reports bad keys and values on stderr but still
    exits 0, so callers check stderr too.
    """
    root = tmp_path / "crossmodal"
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    for name, text in files.items():
        (tmp_path / name).write_text(text.replace("/opt/crossmodal", str(root)))
    paths = [str(tmp_path / name) for name in files]
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *paths], capture_output=True, text=True, timeout=60)


needs_systemd = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")


@needs_systemd
def test_systemd_accepts_the_units(tmp_path):
    names = ["crossmodal-nightly.service", "crossmodal-nightly.timer"]
    result = verify(tmp_path, {name: (SCHEDULE / name).read_text() for name in names})
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@needs_systemd
def test_systemd_verify_rejects_a_broken_unit(tmp_path):
    text = (SCHEDULE / "crossmodal-nightly.service").read_text()
    text = text.replace("TimeoutStartSec=14h", "TimeoutStartSec=fourteen hours")
    result = verify(tmp_path, {"crossmodal-nightly.service": text})
    assert "TimeoutStartSec" in result.stderr


def test_the_crontab_line_runs_the_nightly_under_a_lock_into_syslog():
    lines = [line for line in (SCHEDULE / "crontab").read_text().splitlines() if line.strip() and line[0] != "#"]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    minute, hour, day, month, weekday, command = fields
    for field, low, high in [(minute, 0, 59), (hour, 0, 23), (day, 1, 31), (month, 1, 12), (weekday, 0, 7)]:
        assert field == "*" or low <= int(field) <= high, field
    assert NIGHTLY in command
    assert "flock -n" in command and "logger -t crossmodal-nightly" in command
    assert "%" not in command  # cron turns % into a newline
