"""k8s/: every overlay renders offline with `kubectl kustomize`, passes `kubernetes-validate`
(strict schemas of Kubernetes 1.32) and the project's policies, and agrees with params.yaml
(`PipelineConfig`) on names, images and GPU settings; the MLflow server runs on SQLite (dev) or
PostgreSQL (gpu, components/mlflow-postgres) from its own image (k8s/mlflow/Dockerfile)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ipa_lib.orchestration.cluster import image_problem
from ipa_lib.core.config import Params, load_params
from test_dockerfile import _instructions, _stages

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "gpu", "multinode")  # multinode: gpu + RBAC for TrainJobs/PyTorchJobs
RENDERS = (*OVERLAYS, "dev+postgres")  # what the tests below render and check
K8S_VERSION = "1.32.0"  # kubectl here is v1.32 (kustomize v5.5); stated in k8s/README.md
KUBECTL = shutil.which("kubectl")
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass", "PriorityClass"}
MLFLOW_DOCKERFILE = K8S / "mlflow" / "Dockerfile"
POSTGRES_COMPONENT = K8S / "components" / "mlflow-postgres"


def _params() -> Params:
    """The repo's params.yaml (what runs use), defaults when it is absent."""
    path = ROOT / "params.yaml"
    return load_params(path) if path.exists() else Params()


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[name.lower().replace("_", "-")] = version.split()[0]  # "1.2.3 \" in the hashed lock
    return pins


def _mlflow_image() -> str:
    """The image the MLflow Deployment runs: k8s/mlflow/Dockerfile tagged with the mlflow version."""
    return f"ghcr.io/ipa-align/ipa-mlflow:{_lock_pins()['mlflow']}"


def _kustomize(target: Path) -> str:
    res = subprocess.run([KUBECTL, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"kubectl kustomize {target} failed:\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """overlay -> (rendered file, documents); "dev+postgres": dev with components/mlflow-postgres,
    the way docs/mlflow.md tells users to add it to any overlay."""
    if KUBECTL is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    out = {}
    tmp = tmp_path_factory.mktemp("kustomize")
    combo = tmp / "dev+postgres"
    combo.mkdir()
    rel = lambda p: os.path.relpath(p, combo)  # noqa: E731 (kustomize refuses absolute paths)
    (combo / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": _params().pipeline.namespace,
        "resources": [rel(K8S / "overlays" / "dev")], "components": [rel(POSTGRES_COMPONENT)],
    }))  # fmt: skip
    for name in (*OVERLAYS, "dev+postgres"):
        text = _kustomize(combo if name == "dev+postgres" else K8S / "overlays" / name)
        path = tmp / f"{name}.yaml"
        path.write_text(text)
        out[name] = (path, [d for d in yaml.safe_load_all(text) if d])
    return out


def _docs(rendered, overlay, kind=None):
    return [d for d in rendered[overlay][1] if kind is None or d["kind"] == kind]


def _one(rendered, overlay, kind, name):
    found = [d for d in _docs(rendered, overlay, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_specs(docs):
    for d in docs:
        if d["kind"] in POD_KINDS:
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield f"CronJob/{d['metadata']['name']}", d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield f"Pod/{d['metadata']['name']}", d["spec"]


def _containers(docs):
    for where, spec in _pod_specs(docs):
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            yield f"{where}/{c['name']}", spec, c


def _q(value) -> float:
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(str(value)))


# --------------------------------------------------------------------------- render + schema


@pytest.mark.parametrize("overlay", RENDERS)
def test_overlay_renders_and_passes_kubernetes_validate_cli(rendered, overlay):
    path, docs = rendered[overlay]
    assert len(docs) >= 10
    res = subprocess.run(
        ["kubernetes-validate", "--kubernetes-version", K8S_VERSION, "--strict", "--quiet", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, f"k8s/overlays/{overlay} fails kubernetes-validate {K8S_VERSION}:\n{res.stdout}{res.stderr}"


@pytest.mark.parametrize("overlay", RENDERS)
def test_every_resource_validates_strictly(rendered, overlay):
    import kubernetes_validate

    for doc in _docs(rendered, overlay):
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.32", doc["metadata"]["name"]


def test_validator_rejects_a_broken_manifest(rendered):
    import copy

    import kubernetes_validate

    bad = copy.deepcopy(_one(rendered, "gpu", "Deployment", "mlflow"))
    bad["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}  # typo'd key
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_secret_template_is_valid_and_has_no_values():
    import kubernetes_validate

    for path in (K8S / "secret-templates").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["kind"] == "Secret"
        assert all(v in ("", None) for v in {**doc.get("data", {}), **doc.get("stringData", {})}.values()), path
    for kustomization in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        refs = k.get("resources", []) + k.get("components", [])
        assert not [r for r in refs if "secret" in r], f"{kustomization} applies a secret template"


def test_readme_states_the_validated_version():
    assert f"Kubernetes {K8S_VERSION[:4]}" in (K8S / "README.md").read_text()


# --------------------------------------------------------------------------- policies


@pytest.mark.parametrize("overlay", RENDERS)
def test_every_container_is_non_root_limited_and_pinned(rendered, overlay):
    containers = list(_containers(_docs(rendered, overlay)))
    assert containers
    for where, pod, c in containers:
        pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{where}: runs as uid 0"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities not dropped"
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                assert r in res.get(part, {}), f"{where}: resources.{part}.{r} missing"
            for r, v in res.get("requests", {}).items():
                assert _q(v) <= _q(res["limits"].get(r, v)), f"{where}: request {r} above limit"
        assert image_problem(c["image"]) is None, f"{where}: {image_problem(c['image'])}"


def test_no_latest_tag_anywhere_in_k8s():
    for path in K8S.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            m = re.search(r"\bimage:\s*(\S+)", line)
            if m:
                assert image_problem(m.group(1).strip("'\"")) is None, f"{path}: {line.strip()}"


@pytest.mark.parametrize("overlay", RENDERS)
def test_no_plaintext_secret_values(rendered, overlay):
    for doc in _docs(rendered, overlay, "Secret"):
        values = {**doc.get("data", {}), **doc.get("stringData", {})}
        assert all(v in ("", None) for v in values.values()), f"Secret/{doc['metadata']['name']} carries values"
    for where, _, c in _containers(_docs(rendered, overlay)):
        for env in c.get("env", []):
            if re.search(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY", env["name"]):
                assert "value" not in env, f"{where}: {env['name']} as a literal (use valueFrom.secretKeyRef)"
    for path in K8S.rglob("*.yaml"):  # no kustomize secretGenerator literals either
        text = path.read_text()
        assert "secretGenerator" not in text, path


@pytest.mark.parametrize("overlay", RENDERS)
def test_rbac_is_least_privilege(rendered, overlay):
    write_verbs = {"create", "update", "patch", "delete", "deletecollection", "*"}
    for doc in _docs(rendered, overlay, "Role") + _docs(rendered, overlay, "ClusterRole"):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        for rule in doc["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule.get("apiGroups", []), f"{where}: wildcard"
            if "secrets" in rule["resources"]:
                assert rule.get("resourceNames") and set(rule["verbs"]) == {"get"}, f"{where}: secrets by name only"
            if doc["kind"] == "ClusterRole":
                assert not set(rule["verbs"]) & write_verbs, f"{where}: cluster-wide write"
            elif set(rule["verbs"]) & write_verbs:
                writable = [(["argoproj.io"], ["workflowtaskresults"])]
                if overlay == "multinode":  # the train task submits/deletes its TrainJob or PyTorchJob
                    writable += [(["trainer.kubeflow.org"], ["trainjobs"]), (["kubeflow.org"], ["pytorchjobs"])]
                assert (rule["apiGroups"], rule["resources"]) in writable, where
    binding = _one(rendered, overlay, "RoleBinding", "ipa-pipeline")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ipa-pipeline"}
    assert _one(rendered, overlay, "ServiceAccount", "mlflow")["automountServiceAccountToken"] is False
    assert not _docs(rendered, overlay, "ClusterRoleBinding")


@pytest.mark.parametrize("overlay", RENDERS)
def test_network_policy_quota_and_limit_range(rendered, overlay):
    deny = _one(rendered, overlay, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress"]
    ingress = _one(rendered, overlay, "NetworkPolicy", "mlflow-ingress")["spec"]["ingress"][0]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 5000}]
    assert _docs(rendered, overlay, "ResourceQuota") and _docs(rendered, overlay, "LimitRange")
    ns = _one(rendered, overlay, "Namespace", _params().pipeline.namespace)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] in ("baseline", "restricted")


# --------------------------------------------------------------------------- agreement with params


@pytest.mark.parametrize("overlay", RENDERS)
def test_names_and_images_match_pipeline_config(rendered, overlay):
    pc = _params().pipeline
    docs = _docs(rendered, overlay)
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"].get("namespace") == pc.namespace, f"{d['kind']}/{d['metadata']['name']}"
    _one(rendered, overlay, "PersistentVolumeClaim", pc.pvc_name)
    _one(rendered, overlay, "PersistentVolumeClaim", "mlflow-data")
    svc = _one(rendered, overlay, "Service", pc.mlflow_service)
    assert svc["spec"]["ports"][0]["port"] == 5000
    images = {c["image"] for _, _, c in _containers(docs)}
    assert images <= {pc.image, pc.gpu_image, _mlflow_image(), _postgres_image()}, images
    mlflow_image = _one(rendered, overlay, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert mlflow_image == _mlflow_image() and mlflow_image not in (pc.image, pc.gpu_image)  # not the torch image
    role = _one(rendered, overlay, "Role", "ipa-preflight")
    assert any(pc.mlflow_secret in r.get("resourceNames", []) for r in role["rules"])


def _postgres_image() -> str:
    sts = next(yaml.safe_load_all((POSTGRES_COMPONENT / "postgres.yaml").read_text()))
    return sts["spec"]["template"]["spec"]["containers"][0]["image"]


def _secret_ref(env: dict) -> tuple[str, str] | None:
    ref = env.get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


@pytest.mark.parametrize("overlay", RENDERS)
def test_mlflow_server_uses_a_database_and_artifact_store_on_the_pvc(rendered, overlay):
    pc = _params().pipeline
    dep = _one(rendered, overlay, "Deployment", "mlflow")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    args = c["command"] + c["args"]
    assert args[:2] == ["mlflow", "server"] and "--serve-artifacts" in args
    opts = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
    db = opts["--backend-store-uri"]
    on_pvc = [opts["--artifacts-destination"]]
    if overlay == "dev":
        assert db.startswith("sqlite:////")
        on_pvc.append(db.removeprefix("sqlite:///"))
    else:  # gpu, dev+postgres: components/mlflow-postgres
        assert db.startswith("postgresql+psycopg2://"), db  # bare postgresql:// means psycopg 3 to SQLAlchemy 2.1
        assert int(opts["--workers"]) > 1  # several workers are safe on PostgreSQL
    for path in on_pvc:
        mount = next(m for m in mounts if path.startswith(m + "/"))
        assert claims[mounts[mount]] == "mlflow-data", path
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"  # one SQLite writer / RWO PVC
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert f"{pc.mlflow_service}.{pc.namespace}.svc.cluster.local:5000" in hosts and f"{pc.mlflow_service}:5000" in hosts
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"  # exempt from the host check
    assert "/tmp" in mounts  # writable scratch under a read-only root


@pytest.mark.parametrize("overlay", ["gpu", "dev+postgres"])
def test_postgres_backend_credentials_come_from_one_secret(rendered, overlay):
    from urllib.parse import urlsplit

    c = _one(rendered, overlay, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    db = urlsplit(next(a for a in c["args"] if a.startswith("--backend-store-uri=")).split("=", 1)[1])
    assert db.username is None and db.password is None, "credentials in the URI (they come from PGUSER/PGPASSWORD)"
    sts = _one(rendered, overlay, "StatefulSet", db.hostname)
    svc = _one(rendered, overlay, "Service", db.hostname)
    pod = sts["spec"]["template"]
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and sts["spec"]["replicas"] == 1
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["port"] for p in svc["spec"]["ports"]] == [db.port]
    pg = pod["spec"]["containers"][0]
    assert {p["containerPort"] for p in pg["ports"]} == {db.port}
    server_env = {e["name"]: _secret_ref(e) for e in c["env"]}
    pg_env = {e["name"]: _secret_ref(e) or e.get("value") for e in pg["env"]}
    secret = server_env["PGUSER"][0]
    assert server_env["PGUSER"] == pg_env["POSTGRES_USER"] == (secret, "PGUSER")
    assert server_env["PGPASSWORD"] == pg_env["POSTGRES_PASSWORD"] == (secret, "PGPASSWORD")
    assert pg_env["POSTGRES_DB"] == db.path.lstrip("/")
    template = yaml.safe_load((K8S / "secret-templates" / f"{secret}.yaml").read_text())
    assert {"PGUSER", "PGPASSWORD"} <= set(template["stringData"]), "the secret template lists the keys"
    assert f"create secret generic {secret}" in (K8S / "README.md").read_text()
    # data on its own claim, under the mount (not the volume root, which may hold lost+found)
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    mount = next(m["mountPath"] for m in pg["volumeMounts"] if m["name"] == claim)
    assert pg_env["PGDATA"].startswith(mount + "/")
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    assert pg["readinessProbe"]["exec"]["command"][0] == "pg_isready"


@pytest.mark.parametrize("overlay", ["gpu", "dev+postgres"])
def test_only_the_mlflow_server_reaches_the_database(rendered, overlay):
    pols = {d["metadata"]["name"]: d["spec"] for d in _docs(rendered, overlay, "NetworkPolicy")}
    db_labels = _one(rendered, overlay, "StatefulSet", "mlflow-postgres")["spec"]["template"]["metadata"]["labels"]
    server = {"app.kubernetes.io/name": "mlflow"}
    ingress = [p for p in pols.values() if "Ingress" in p["policyTypes"] and p["podSelector"].get("matchLabels", {}).items() <= db_labels.items() and p["podSelector"]]
    rules = [r for p in ingress for r in p.get("ingress", [])]
    assert rules and all(f == {"podSelector": {"matchLabels": server}} for r in rules for f in r["from"]), rules
    assert all(r["ports"] == [{"protocol": "TCP", "port": 5432}] for r in rules)
    egress = pols["mlflow-postgres-egress"]
    assert egress["policyTypes"] == ["Egress"] and not egress.get("egress")  # the database calls nobody
    out = [r for p in pols.values() if p["podSelector"].get("matchLabels") == server and "Egress" in p["policyTypes"] for r in p.get("egress", [])]
    assert {"protocol": "TCP", "port": 5432} in [port for r in out for port in r["ports"]]


def test_external_database_example_of_the_docs_renders(tmp_path):
    """docs/mlflow.md's overlay for an external database: no StatefulSet, the server on that host."""
    import kubernetes_validate

    if KUBECTL is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    block = re.search(r"```yaml\n(components:.*?)```", (ROOT / "docs" / "mlflow.md").read_text(), re.S).group(1)
    k = yaml.safe_load(block.replace("../../components/", os.path.relpath(K8S / "components", tmp_path) + "/"))
    k |= {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
          "namespace": _params().pipeline.namespace, "resources": [os.path.relpath(K8S / "overlays" / "dev", tmp_path)]}  # fmt: skip
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(k))
    docs = [d for d in yaml.safe_load_all(_kustomize(tmp_path)) if d]
    for d in docs:
        assert kubernetes_validate.validate(d, K8S_VERSION, strict=True) == "1.32", d["metadata"]["name"]
    assert not [d for d in docs if d["metadata"]["name"] == "mlflow-postgres" and d["kind"] in ("StatefulSet", "Service")]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    uri = [a for a in args if a.startswith("--backend-store-uri=")]
    assert len(uri) == 1 and "@" not in uri[0] and uri[0].startswith("--backend-store-uri=postgresql+psycopg2://") and "mlflow-postgres" not in uri[0]


def test_mlflow_image_is_slim_pinned_non_root_with_a_healthcheck():
    """k8s/mlflow/Dockerfile: mlflow and psycopg2 at the lock's versions, no torch, uid 10001,
    a HEALTHCHECK on /health; the manifests use its tag (the mlflow version)."""
    global_args, stages = _stages(_instructions(MLFLOW_DOCKERFILE.read_text()))
    pins = _lock_pins()
    assert "psycopg2-binary" in pins, "psycopg2-binary is not in requirements.lock"
    base = global_args["PYTHON_IMAGE"]
    assert image_problem(base) is None and re.search(r"\d+\.\d+\.\d+", base), base
    assert {s["from"] for s in stages} == {"${PYTHON_IMAGE}"}  # both stages on the pinned slim base
    deps, final = stages[0], stages[-1]
    assert deps["args"]["MLFLOW_VERSION"] == pins["mlflow"]
    install = next(a for i, a in deps["instrs"] if i == "RUN" and "pip install" in a)
    assert "--require-hashes" in install and "-r /tmp/requirements-mlflow.lock" in install and "mlflow==${MLFLOW_VERSION}" in install
    assert "torch" not in install.replace('! /opt/mlflow/bin/python -c "import torch"', "")
    instrs = dict(final["instrs"])  # the last of each instruction
    assert instrs["USER"] == "10001:10001"
    assert "HEALTHCHECK" in instrs and "/health" in instrs["HEALTHCHECK"]
    assert instrs["ENTRYPOINT"] == '["mlflow"]'
    assert "requirements" not in " ".join(a for i, a in final["instrs"] if i == "COPY")  # only the venv moves over
    assert f"-t {_mlflow_image()} ." in MLFLOW_DOCKERFILE.read_text()
    assert yaml.safe_load_all((K8S / "base" / "mlflow.yaml").read_text()).__next__()["spec"]["template"]["spec"]["containers"][0]["image"] == _mlflow_image()


def test_gpu_overlay_matches_the_gpu_node_pool_settings(rendered):
    pc = _params().pipeline
    job = _one(rendered, "gpu", "Job", "ipa-gpu-smoke")
    spec = job["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == pc.node_selector
    assert {"key": pc.gpu_toleration_key, "operator": "Exists"} in spec["tolerations"]
    c = spec["containers"][0]
    assert c["image"] == pc.gpu_image
    assert int(c["resources"]["limits"][pc.accelerator_type]) == pc.accelerator_limit
    ws = _one(rendered, "gpu", "PersistentVolumeClaim", pc.pvc_name)
    assert ws["spec"]["accessModes"] == ["ReadWriteMany"]  # parallel train pods on several nodes
    hard = _one(rendered, "gpu", "ResourceQuota", "ipa-quota")["spec"]["hard"]
    assert _q(hard[f"requests.{pc.accelerator_type}"]) >= pc.accelerator_limit * len(pc.betas)
    n = len(pc.betas)
    assert _q(hard["limits.memory"]) >= n * _q(pc.memory_limit) and _q(hard["limits.cpu"]) >= n * _q(pc.cpu_limit)
    max_ = _one(rendered, "gpu", "LimitRange", "ipa-limits")["spec"]["limits"][0]["max"]
    assert _q(max_["memory"]) >= _q(pc.memory_limit) and _q(max_["cpu"]) >= _q(pc.cpu_limit)


def test_dev_overlay_is_small_and_gpu_free(rendered):
    pc = _params().pipeline
    assert not _docs(rendered, "dev", "Job")
    hard = _one(rendered, "dev", "ResourceQuota", "ipa-quota")["spec"]["hard"]
    assert _q(hard[f"requests.{pc.accelerator_type}"]) == 0
    ws = _one(rendered, "dev", "PersistentVolumeClaim", pc.pvc_name)
    assert ws["spec"]["accessModes"] == ["ReadWriteOnce"] and _q(ws["spec"]["resources"]["requests"]["storage"]) <= _q("50Gi")
    args = _one(rendered, "dev", "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--workers=1" in args
