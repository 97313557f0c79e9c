"""deploy/: what can be checked without Docker or a cluster: every file parses, the Prefect deployments
point at real flows with the right schedule, limits and pools, and every cycle config validates."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from orchestrator.settings import CycleSettings, load_defaults

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_prefect_yaml_deploys_the_weekly_cycle_and_each_worker_step():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    spec = PrefectYamlModel.model_validate(yaml.safe_load((DEPLOY / "prefect.yaml").read_text()))
    by_name = {d.name: d for d in spec.deployments}
    cycle = by_name["weekly-cycle"]
    assert cycle.schedules[0].cron == "0 6 * * 1" and cycle.parameters == {}
    assert (cycle.concurrency_limit.limit, str(cycle.concurrency_limit.collision_strategy)) == (1, "ENQUEUE")
    assert cycle.work_pool.name == "cpu"
    root = DEPLOY.parent
    assert load_flow_from_entrypoint(str(root / cycle.entrypoint)).name == "weekly-cycle"
    steps = {name: d for name, d in by_name.items() if name != "weekly-cycle"}
    assert all(d.work_pool.name == "gpu" for d in steps.values())
    flows = {load_flow_from_entrypoint(str(root / d.entrypoint)).name for d in steps.values()}
    # the deployments the orchestrator's DeploymentRunner asks for by default all exist
    expected = set(CycleSettings().step_deployments.values())
    assert {f"{flow}/{name}" for flow in flows for name in steps} >= expected


def test_every_cycle_config_shipped_is_valid(tmp_path):
    production = load_defaults(DEPLOY / "cycle.json")  # the step configs' overrides checked too
    assert production.runner == "deployment" and production.work_pool == "gpu"
    (configmap,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    (tmp_path / "cycle.json").write_text(configmap["data"]["cycle.json"])
    assert load_defaults(tmp_path / "cycle.json").runner == "deployment"


def test_compose_runs_the_whole_stack():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "migrate", "api", "worker-cpu", "worker-gpu", "deploy-flows"} <= set(services)
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["api"]["environment"]["RATCHET_CYCLE_LAUNCHER"] == "deployment"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and "--pool" in services["worker-gpu"]["command"]


def test_kubernetes_manifests_and_gpu_pool_template():
    kinds = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        kinds += [(doc["kind"], doc["metadata"]["name"]) for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert {("Deployment", "ratchet-api"), ("Deployment", "prefect-server"), ("Deployment", "prefect-worker-gpu"),
            ("Deployment", "prefect-worker-cpu"), ("PersistentVolumeClaim", "ratchet-scratch")} <= set(kinds)
    gpu = json.loads((DEPLOY / "kubernetes" / "work-pools" / "gpu.json").read_text())
    pod = gpu["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert {"gpu_count", "image", "env", "node_selector"} <= set(gpu["variables"]["properties"])
    cpu = json.loads((DEPLOY / "kubernetes" / "work-pools" / "cpu.json").read_text())
    assert "nvidia.com/gpu" not in json.dumps(cpu)


def test_the_multi_node_job_rendezvouses_its_pods_at_pod_zero_and_runs_a_step_config_the_cycle_writes():
    from orchestrator.runners import STEPS
    from orchestrator.torchrun import CONFIG_FILENAME, DISTRIBUTED_STEPS

    service, job = yaml.safe_load_all((DEPLOY / "kubernetes" / "torchrun-multinode.yaml").read_text())
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)
    assert container["command"] == ["python", "-m", "torch.distributed.run"]
    assert int(args["nnodes"]) == spec["completions"] and args["rdzv_backend"] == "c10d"
    assert args["rdzv_endpoint"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}:29400"
    assert int(args["nproc_per_node"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    module = container["args"][container["args"].index("-m") + 1]
    assert module in {STEPS[s][0] for s in DISTRIBUTED_STEPS}
    assert container["args"][-1].endswith(f".{CONFIG_FILENAME}")
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "ratchet-scratch"
