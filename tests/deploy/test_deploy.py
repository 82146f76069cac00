"""Deployment files: compose, Prometheus, Grafana, Kubernetes and the Dockerfile parse and say
what the service needs, and every metric they query is one the app exports. No Docker engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.process import ServerProcess
from tests.support.venv import linked_venv
from tests.support.wan_card import write_wan_card

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVICES = {"api", "worker", "redis", "prometheus", "grafana"}


# ---- metric names the running app exports ---------------------------------------------------


@pytest.fixture(scope="module")
def exported_series(image_server) -> set[str]:
    """Every series name a live server's /metrics carries, from its `# TYPE` lines (the image's
    `qarvd serve` with its embedded Redis and worker, so the job families are there too)."""
    text = httpx.get(image_server.url + "/metrics", timeout=30).text
    assert "qarvd_jobs_queue_depth" in text  # the jobs collector answered from Redis
    series = set()
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split()
        if kind == "histogram":
            series |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "counter":
            series.add(name if name.endswith("_total") else f"{name}_total")
        else:
            series.add(name)
    return series


def test_app_exports_the_documented_metrics(exported_series):
    assert {
        "qarvd_frames_sent_total",
        "qarvd_time_to_first_frame_seconds_bucket",
        "qarvd_drift_psnr_db_bucket",
        "qarvd_jobs_queue_depth",
        "qarvd_job_runs_total",
        "qarvd_worker_heartbeat_age_seconds",
        "qarvd_ready",
    } <= exported_series


PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (in {...}, by/on/without/ignoring/group_x (...)), durations or strings."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges, subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables ($__rate_interval)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_promql_metrics_parser():
    got = promql_metrics(
        'histogram_quantile(0.9, sum by (le, model) (rate(x_bucket{a="b"}[5m]))) > 2 '
        "unless on () count(y) > 0 and max without (w) (z[$__rate_interval] offset 1h)"
    )
    assert got == {"x_bucket", "y", "z"}


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "qarvd.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", []) if t.get("expr")]


# ---- docker compose ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (.ci/run installs it)")
def test_docker_compose_accepts_the_file():
    # Compose's own schema and interpolation, no engine needed.
    r = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert set(yaml.safe_load(r.stdout)["services"]) == SERVICES


def test_compose_services(compose):
    assert set(compose["services"]) == SERVICES
    assert set(compose["volumes"]) >= {"artifacts", "redis-data", "prometheus-data", "grafana-data"}


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_app_services(compose, name):
    s = compose["services"][name]
    devices = s["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == 1 and "gpu" in d["capabilities"] for d in devices)
    assert s["environment"]["QARVD_REDIS_URL"] == "redis://redis:6379/0"
    assert s["environment"]["QARVD_ARTIFACT_DIR"] == "/data/artifacts"
    assert s["environment"]["QARVD_DEVICE"] == "${QARVD_DEVICE:-cuda}"  # the reserved GPU, by default
    assert "artifacts:/data/artifacts" in s["volumes"]
    assert s["depends_on"]["redis"]["condition"] == "service_healthy"
    assert s["restart"] == "unless-stopped"
    assert "build" in s and "image" in s
    assert s["command"] == (["worker"] if name == "worker" else ["serve", "--host", "0.0.0.0"])
    if name == "api":
        assert any(str(p).endswith(":8000") for p in s["ports"])


def test_compose_healthchecks(compose):
    for name, s in compose["services"].items():
        test = s.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    joined = {name: " ".join(s["healthcheck"]["test"]) for name, s in compose["services"].items()}
    assert "/healthz" in joined["api"]
    assert "redis-cli ping" in joined["redis"]
    assert "/-/healthy" in joined["prometheus"]
    assert "/api/health" in joined["grafana"]
    assert "qarvd:worker:" in joined["worker"]  # WORKER_HEARTBEAT's key prefix


def test_compose_worker_health_key_matches_the_worker():
    from service.jobs.constants import WORKER_HEARTBEAT

    assert WORKER_HEARTBEAT.format(name="") == "qarvd:worker:"


def test_compose_redis_and_monitoring(compose):
    s = compose["services"]
    redis_cmd = " ".join(s["redis"]["command"])
    assert s["redis"]["image"].startswith("redis:7")
    assert "--appendonly yes" in redis_cmd and "--appendfsync everysec" in redis_cmd
    assert "redis-data:/data" in s["redis"]["volumes"]
    assert any(v.startswith("./deploy/prometheus:") for v in s["prometheus"]["volumes"])
    assert any(v.startswith("./deploy/grafana/provisioning:") for v in s["grafana"]["volumes"])
    assert any(v.startswith("./deploy/grafana/dashboards:") for v in s["grafana"]["volumes"])
    assert "prometheus" in s["grafana"]["depends_on"]
    # Named volumes used by the services are all declared.
    for svc in s.values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith(("./", "/")):
                assert src in compose["volumes"], src


# ---- Prometheus and Grafana -------------------------------------------------------------------


def test_prometheus_config():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    targets = [t for j in jobs.values() for sc in j.get("static_configs", []) for t in sc["targets"]]
    assert "api:8000" in targets
    assert all(j.get("metrics_path", "/metrics") == "/metrics" for j in jobs.values())
    rule_files = [Path(f).name for f in cfg["rule_files"]]
    assert rule_files == ["alerts.yml"]


def test_alert_rules(exported_series):
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {"QarvdLowFps", "QarvdHighDrift", "QarvdQueueBacklog", "QarvdWorkerDown", "QarvdNotReady"} <= names
    assert len(names) == len(rules)
    for r in rules:
        assert r["labels"]["severity"] in {"info", "warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"], r["alert"]
        used = promql_metrics(r["expr"])
        assert used, r["alert"]
        assert used <= exported_series, f"{r['alert']}: not exported: {sorted(used - exported_series)}"


def test_dashboard(exported_series):
    d = dashboard()
    assert d["uid"] == "qarvd"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    exprs = dashboard_exprs()
    used = set().union(*(promql_metrics(e) for e in exprs))
    assert used <= exported_series, f"not exported: {sorted(used - exported_series)}"
    for wanted in (
        "qarvd_frames_sent_total",
        "qarvd_time_to_first_frame_seconds_bucket",
        "qarvd_frame_generation_seconds_bucket",
        "qarvd_drift_psnr_db_bucket",
        "qarvd_sessions_active",
        "qarvd_frames_dropped_total",
        "qarvd_jobs_queue_depth",
        "qarvd_job_runs_total",
    ):
        assert wanted in used, wanted
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "prometheus", p["title"]


def test_grafana_provisioning():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/qarvd.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool(tmp_path):
    rules = DEPLOY / "prometheus" / "alerts.yml"
    subprocess.run(["promtool", "check", "rules", str(rules)], check=True, timeout=60)
    # prometheus.yml names the rules by their in-container path: check a copy pointing here.
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(rules)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], check=True, timeout=60)


# ---- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert doc.get("apiVersion") and doc.get("kind"), path.name
            assert doc.get("metadata", {}).get("name"), path.name
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in docs, key
            docs[key] = doc
    return docs


def test_k8s_kinds(k8s):
    kinds = {kind for kind, _ in k8s}
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "Ingress",
        "ScaledObject",
        "StatefulSet",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PersistentVolumeClaim",
    } <= kinds
    assert ("Deployment", "qarvd-api") in k8s and ("Deployment", "qarvd-worker") in k8s


def test_k8s_builtin_kinds_match_the_kubernetes_schemas(k8s):
    import kubernetes_validate  # Kubernetes' own OpenAPI schemas; strict: unknown fields fail

    custom = {"Kustomization", "ScaledObject", "ServiceMonitor"}  # CRDs: checked field by field below
    for (kind, name), doc in k8s.items():
        if kind not in custom:
            try:
                kubernetes_validate.validate(doc, "1.32.0", strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{kind}/{name}: {e.message}")


def test_k8s_kustomization_lists_every_file(k8s):
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def _container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("name", ["qarvd-api", "qarvd-worker"])
def test_k8s_app_pods(k8s, name):
    d = k8s[("Deployment", name)]
    pod = d["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    c = _container(d)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"configMapRef": {"name": "qarvd-config"}} in c["envFrom"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    (vol,) = [v for v in pod["volumes"] if v["name"] in mounts]
    assert mounts[vol["name"]] == "/data/artifacts"
    assert vol["persistentVolumeClaim"]["claimName"] == "qarvd-artifacts"
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_api(k8s):
    d = k8s[("Deployment", "qarvd-api")]
    pod = d["spec"]["template"]["spec"]
    c = _container(d)
    assert c["args"] == ["serve", "--host", "0.0.0.0"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"secretRef": {"name": "qarvd-secrets"}} in c["envFrom"]
    # Grace covers the preStop sleep plus uvicorn's 5 s graceful shutdown after 1012 closes.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + 5 + 5
    svc = k8s[("Service", "qarvd-api")]
    assert svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ing = k8s[("Ingress", "qarvd-api")]
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert ann["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert ann["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "qarvd-api"
    pdb = k8s[("PodDisruptionBudget", "qarvd-api")]
    assert pdb["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    sm = k8s[("ServiceMonitor", "qarvd-api")]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def test_k8s_worker_scaled_on_the_saq_queue(k8s):
    from saq.queue.redis import RedisQueue

    from service.jobs.constants import QUEUE_NAME

    c = _container(k8s[("Deployment", "qarvd-worker")])
    assert c["args"] == ["worker"]
    so = k8s[("ScaledObject", "qarvd-worker")]
    assert so["spec"]["scaleTargetRef"]["name"] == "qarvd-worker"
    lists = {t["metadata"]["listName"] for t in so["spec"]["triggers"] if t["type"] == "redis"}
    # The key SAQ pushes waiting jobs to (RedisQueue._queued = namespace("queued")).
    queued = RedisQueue.namespace(type("Q", (), {"name": QUEUE_NAME})(), "queued")
    assert queued == "saq:qarvd-quantization:queued"
    assert queued in lists


def test_k8s_config_and_secret(k8s):
    from service.settings import Settings

    fields = {f"QARVD_{name.upper()}" for name in Settings.model_fields}
    cm = k8s[("ConfigMap", "qarvd-config")]["data"]
    assert set(cm) <= fields, sorted(set(cm) - fields)
    assert cm["QARVD_REDIS_URL"].startswith("redis://redis:6379")
    assert cm["QARVD_ARTIFACT_DIR"] == "/data/artifacts"
    assert cm["QARVD_DEVICE"] == "cuda"  # the pods' GPU
    secret = k8s[("Secret", "qarvd-secrets")]["stringData"]
    assert isinstance(json.loads(secret["QARVD_API_KEYS"]), list)
    # The values parse as the service's settings.
    Settings(**{k.removeprefix("QARVD_").lower(): v for k, v in cm.items() if k != "QARVD_ALLOWED_ORIGINS"})


def test_k8s_redis_and_storage(k8s):
    sts = k8s[("StatefulSet", "redis")]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = " ".join(c["args"])
    assert "--appendonly yes" in args
    assert sts["spec"]["volumeClaimTemplates"]
    assert sts["spec"]["serviceName"] in {name for kind, name in k8s if kind == "Service"}
    pvc = k8s[("PersistentVolumeClaim", "qarvd-artifacts")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ---- Dockerfile -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> str:
    # Join continuation lines so each instruction is one line.
    return re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())


def test_dockerfile(dockerfile):
    lines = [ln.strip() for ln in dockerfile.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert len(froms) >= 3  # multi-stage
    assert "ARG VARIANT=cuda" in lines
    assert any("nvidia/cuda:" in ln for ln in froms) and any("python:3.11-slim" in ln for ln in froms)
    torch_installs = [ln for ln in lines if "pip install torch" in ln]
    assert len(torch_installs) == 2
    assert all("torch==2.13.0" in ln for ln in torch_installs)
    assert {ln.split("--index-url")[1].split()[0].rsplit("/", 1)[1] for ln in torch_installs} == {"cu128", "cpu"}
    pip_installs = [ln for ln in lines if "pip install" in ln]
    assert any(re.search(r'pip install "\.\[serve,wan\]"(\s|$)', ln) for ln in pip_installs)  # Wan cards need [wan]
    assert not any("[dev" in ln or ",dev" in ln or "pytest" in ln for ln in pip_installs)
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1].split(":")[0] == "10001"  # numeric, for runAsNonRoot
    (health,) = [ln for ln in lines if ln.upper().startswith("HEALTHCHECK")]
    assert "http://127.0.0.1:8000/healthz" in health and "urllib" in health and "curl" not in health
    assert 'ENTRYPOINT ["qarvd"]' in lines
    assert 'CMD ["serve", "--host", "0.0.0.0"]' in lines
    assert "QARVD_ARTIFACT_DIR=/data/artifacts" in dockerfile and "QARVD_DATA_DIR=/data/qarvd" in dockerfile


def test_dockerignore_keeps_the_package():
    ignored = {ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "artifacts", ".qarvd"} <= ignored
    assert not {"qarvd_core", "service", "pyproject.toml", "README.md"} & ignored


@pytest.fixture(scope="module")
def image_server(dockerfile, tmp_path_factory):
    """The image's install, replayed without the base image: the builder stage's COPY set, the
    CPU variant's torch pin, `pip install ".[serve,wan]"` and its import check; then its entrypoint
    serving from the installed (not editable) package, with a tiny Wan card. The venv starts with
    what `qarvd[serve,wan]` pulls in, linked from this environment (what the image would unpack
    from the same wheels): pip builds and installs the package itself, and a dependency the
    extras do not declare is missing there as in the image."""
    tmp = tmp_path_factory.mktemp("image")
    lines = [ln.strip() for ln in dockerfile.splitlines()]
    torch_pin = next(ln for ln in lines if "pip install torch==" in ln and ln.endswith("/cpu"))
    torch_pin = torch_pin.removeprefix("RUN ").split(" --index-url")[0]  # this machine's wheel, not the index
    src = tmp / "src"
    src.mkdir()
    for ln in lines:
        if ln.startswith("COPY ") and "--from" not in ln:
            *paths, _dest = ln.split()[1:]
            for p in paths:
                (shutil.copytree if (ROOT / p).is_dir() else shutil.copy)(ROOT / p, src / p)
    install = next(ln for ln in lines if ln.startswith('RUN pip install ".[serve,wan]"')).removeprefix("RUN ")
    bin_dir = linked_venv(tmp / "venv", "qarvd[serve,wan]")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    for step in (torch_pin, install):
        r = subprocess.run(step + " -q", shell=True, cwd=src, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
    card = write_wan_card(tmp / "cards")
    server = ServerProcess(
        command=[str(bin_dir / "qarvd")],
        cwd=tmp,
        data_dir=tmp / "data",
        artifact_dir=tmp / "a",
        threads=1,
        model_cards=json.dumps([str(card)]),
    )
    yield server
    server.stop()


def test_dockerfile_install_steps_work_in_a_plain_venv(image_server):
    models = httpx.get(image_server.url + "/v1/models", timeout=10).json()
    assert {"tiny-world", "tiny-wan"} <= {m["id"] for m in models}
    assert httpx.get(image_server.url + "/", timeout=10).status_code == 200  # the demo page is package data
    # The card loads (diffusers' VAE, transformers' UMT5) and renders.
    body = {"model": "tiny-wan", "prompt": "a cat", "chunks": 1}
    video = httpx.post(image_server.url + "/v1/videos", json=body, timeout=120)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4", video.text[:500]
