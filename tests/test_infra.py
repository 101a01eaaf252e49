"""Keeps infra/ honest: manifests parse and have the expected kinds, every `python -m jobs.X`
command line in them (and in the runbook and README) runs an existing job with flags its
parser accepts, the Dockerfile matches constraints.txt, no credentials are written down, and
bench/gpu_check.sh (the two GPU-machine calls) runs its logic in a dry run.

Static checks only (no Docker engine, no Kubernetes, no Ray cluster, no GPU): a few seconds, most
of it importing the jobs (jobs.train imports torch), plus about half a minute for the two dry runs
of bench/gpu_check.sh.
"""
import argparse
import contextlib
import copy
import importlib
import importlib.util
import io
import itertools
import os
import re
import shlex
import subprocess
import sys
import zipfile

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")
DOCKERFILE = os.path.join(INFRA, "docker", "Dockerfile")
RUNBOOK = os.path.join(INFRA, "RUNBOOK.md")
README = os.path.join(ROOT, "README.md")
CLUSTER_AWS = os.path.join(INFRA, "ray", "cluster-aws.yaml")
RUNTIME_ENV = os.path.join(INFRA, "ray", "runtime-env.yaml")
KUBERAY = os.path.join(INFRA, "kuberay")

# Every YAML file under infra/ and the (apiVersion, kind) of each of its documents, in order.
# None: not a Kubernetes manifest (checked by its own test below).
EXPECTED_MANIFESTS = {
    "kuberay/raycluster.yaml": [("v1", "ServiceAccount"), ("ray.io/v1", "RayCluster")],
    "kuberay/rayjob-infer.yaml": [("ray.io/v1", "RayJob")],
    "kuberay/rayjob-train.yaml": [("ray.io/v1", "RayJob")],
    "kuberay/cronjob-nightly.yaml": [
        ("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("v1", "ConfigMap"), ("batch/v1", "CronJob")],
    "ray/cluster-aws.yaml": None,
    "ray/runtime-env.yaml": None,
}
ARCHS = ["8.0", "8.6", "8.9", "9.0"]


# ------------------------------------------------------------------------------ helpers
def read(path):
    with open(path) as f:
        return f.read()


def load_docs(path):
    return [d for d in yaml.safe_load_all(read(path)) if d is not None]


def infra_yaml_files():
    found = []
    for dirpath, _, names in os.walk(INFRA):
        found += [os.path.relpath(os.path.join(dirpath, n), INFRA) for n in names if n.endswith((".yaml", ".yml"))]
    return sorted(found)


def pins():
    out = {}
    for line in read(os.path.join(ROOT, "constraints.txt")).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def strings_in(obj):
    """Every string leaf of a parsed YAML document; strings that are themselves manifests
    (a ConfigMap holding a RayJob template) or YAML blocks are searched too."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from strings_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings_in(v)
    elif isinstance(obj, str):
        if "\n" in obj and re.search(r"^(kind|env_vars):", obj, re.M):
            for doc in yaml.safe_load_all(obj):  # searched as parsed YAML, not as raw text
                yield from strings_in(doc)
        else:
            yield obj


def embedded_docs(obj):
    """Manifests embedded as YAML strings (a ConfigMap holding a RayJob template)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from embedded_docs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from embedded_docs(v)
    elif isinstance(obj, str) and "\n" in obj and re.search(r"^kind:", obj, re.M):
        yield from (d for d in yaml.safe_load_all(obj) if d is not None)


SHELL_STOP = {";", "&&", "||", "|", "&", ">", ">>", "2>", "2>&1", ")"}
JOB_RE = re.compile(r"\bpython3?\s+-m\s+(jobs(?:\.[A-Za-z_]\w*)+)")
RAY_JOB_RE = re.compile(r"\bray\s+job\s+([a-z]+)\b")


def _args_after(line, end):
    rest = line[end:].split("`", 1)[0]  # inline code in Markdown ends at the backtick
    tokens = shlex.split(rest, comments=True)
    return list(itertools.takewhile(lambda t: t not in SHELL_STOP, tokens))


def commands_in_text(text, regex):
    """(name, argv) of each command the regex finds; shell line continuations are joined."""
    text = re.sub(r"\\\n", " ", text)
    return [(m.group(1), _args_after(line, m.end())) for line in text.splitlines() for m in regex.finditer(line)]


def job_commands(path):
    if path.endswith((".yaml", ".yml")):
        return [c for doc in load_docs(path) for s in strings_in(doc) for c in commands_in_text(s, JOB_RE)]
    return commands_in_text(read(path), JOB_RE)


class _Captured(Exception):
    pass


_PARSERS = {}


def job_parser(module):
    """The argparse parser of `python -m <module>`.

    Uses the job's build_parser() when it has one (jobs.infer, jobs.train). Otherwise
    (jobs.evaluate/jobs.synthetic build it inside main) the parser is captured: parse_args is
    intercepted while the job's parse_args()/main() builds it, before anything runs.
    """
    if module in _PARSERS:
        return _PARSERS[module]
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"`python -m {module}`: no such module"
    entry = f"{module}.__main__" if spec.submodule_search_locations is not None else module
    assert importlib.util.find_spec(entry) is not None, f"`python -m {module}`: {module} is a package without __main__"
    mod = importlib.import_module(entry)
    if hasattr(mod, "build_parser"):
        parser = mod.build_parser()
    else:
        build = getattr(mod, "parse_args", None) or getattr(mod, "main")
        captured = []

        def capture(self, args=None, namespace=None):
            captured.append(self)
            raise _Captured

        original = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = capture
        try:
            build([])
        except _Captured:
            pass
        finally:
            argparse.ArgumentParser.parse_args = original
        assert captured, f"{entry}: neither build_parser() nor an argparse parser built by {build.__name__}()"
        parser = captured[0]
    _PARSERS[module] = parser
    return parser


def check_flags(module, argv, where):
    """Every --flag is one of the parser's own option strings (argparse would also accept
    unambiguous prefixes; a manifest must not rely on that)."""
    parser = job_parser(module)
    options = {s for a in parser._actions for s in a.option_strings}
    flags = [t.split("=", 1)[0] for t in argv if t.startswith("-") and t != "-" and not re.fullmatch(r"-\d.*", t)]
    unknown = [f for f in flags if f not in options]
    assert not unknown, f"{where}: `python -m {module}` has no option {unknown} (it has {sorted(options)})"
    return flags


def check_full_parse(module, argv, where):
    """The whole command line parses: required flags present, values of the right type."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            job_parser(module).parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{where}: `python -m {module} {shlex.join(argv)}` is rejected: {err.getvalue().strip()} (exit {e.code})")


# --------------------------------------------------------------------- manifests parse
def test_every_infra_yaml_is_known_and_has_the_expected_kinds():
    assert infra_yaml_files() == sorted(EXPECTED_MANIFESTS), "a YAML file under infra/ is missing or not listed here"
    checked = 0
    for rel, expected in EXPECTED_MANIFESTS.items():
        docs = load_docs(os.path.join(INFRA, rel))
        assert docs and all(isinstance(d, dict) for d in docs), f"{rel}: not YAML mappings"
        if expected is not None:
            assert [(d.get("apiVersion"), d.get("kind")) for d in docs] == expected, rel
            for d in docs:
                assert d.get("metadata", {}).get("name"), f"{rel}: {d['kind']} without metadata.name"
            checked += len(docs)
    assert checked == 9


def test_cluster_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(read(CLUSTER_AWS))
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before launching
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu.values()), "GPU workers must autoscale"
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in gpu.values()} >= {"g5"}
    # the image holds everything: nothing is installed when a node starts
    assert not config.get("setup_commands") and not config.get("worker_setup_commands") and not config.get("head_setup_commands")
    assert not config.get("file_mounts")

    broken = copy.deepcopy(config)
    broken["available_node_types"][next(iter(gpu))]["min_worker"] = 1  # a typo the schema must reject
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_images_and_ray_version_agree_with_constraints():
    images = {yaml.safe_load(read(CLUSTER_AWS))["docker"]["image"]}
    ray_versions, checked = set(), 0
    for name in ("raycluster.yaml", "rayjob-infer.yaml", "rayjob-train.yaml", "cronjob-nightly.yaml"):
        docs = load_docs(os.path.join(KUBERAY, name))
        for doc in docs + [d for d in docs for d in embedded_docs(d)]:
            spec = doc.get("spec", {})
            cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec") if doc["kind"] == "RayJob" else None
            if cluster is None:
                continue
            ray_versions.add(cluster["rayVersion"])
            for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
                for c in group["template"]["spec"]["containers"]:
                    images.add(c["image"])
                    checked += 1
    assert checked == 8  # head + GPU worker in RayCluster, 2 RayJobs and the nightly template
    assert len(images) == 1, f"manifests use different images: {sorted(images)}"
    assert ray_versions == {pins()["ray"]}, f"rayVersion {ray_versions} != ray=={pins()['ray']} in constraints.txt"


def _ray_clusters():
    out = []
    for name in ("raycluster.yaml", "rayjob-infer.yaml", "rayjob-train.yaml", "cronjob-nightly.yaml"):
        docs = load_docs(os.path.join(KUBERAY, name))
        for doc in docs + [d for d in docs for d in embedded_docs(d)]:
            if doc["kind"] == "RayCluster":
                out.append((name, doc["spec"]))
            elif doc["kind"] == "RayJob":
                out.append((name, doc["spec"]["rayClusterSpec"]))
    return out


def test_ray_clusters_autoscale_gpu_workers():
    clusters = _ray_clusters()
    assert len(clusters) == 4
    for name, spec in clusters:
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{name}: work would land on the head"
        groups = spec["workerGroupSpecs"]
        assert groups, name
        for g in groups:
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] >= 1, name
            for c in g["template"]["spec"]["containers"]:
                limits = c["resources"]["limits"]
                assert int(limits["nvidia.com/gpu"]) >= 1, f"{name}: worker without a GPU limit"
                assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]


def test_rayjobs_clean_up_and_carry_no_credentials_in_their_runtime_env():
    jobs = {}
    for name in ("rayjob-infer.yaml", "rayjob-train.yaml"):
        (doc,) = load_docs(os.path.join(KUBERAY, name))
        jobs[name] = doc["spec"]
    for name, spec in jobs.items():
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0, name
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert isinstance(env, dict) and env["env_vars"]["AWS_REGION"], name
        secret_like = [k for k in env["env_vars"] if SECRET_NAME.search(k)]
        assert not secret_like, f"{name}: credentials in runtimeEnvYAML: {secret_like}"
    assert jobs["rayjob-infer.yaml"]["entrypoint"].split()[:3] == ["python", "-m", "jobs.infer"]
    assert jobs["rayjob-train.yaml"]["entrypoint"].split()[:3] == ["python", "-m", "jobs.train"]
    train = shlex.split(jobs["rayjob-train.yaml"]["entrypoint"])
    assert "--use-gpu" in train and "--num-workers" in train


def test_nightly_cronjob_creates_the_infer_rayjob_incrementally_with_a_unique_name():
    sa, role, binding, configmap, cron = load_docs(os.path.join(KUBERAY, "cronjob-nightly.yaml"))
    (infer,) = load_docs(os.path.join(KUBERAY, "rayjob-infer.yaml"))
    (template,) = [yaml.safe_load(v) for v in configmap["data"].values()]
    # the nightly template is the infer RayJob, not a drifting copy
    assert template["apiVersion"] == infer["apiVersion"] and template["kind"] == "RayJob"
    assert template["spec"] == infer["spec"]
    assert "--full" not in shlex.split(template["spec"]["entrypoint"]), "nightly runs are incremental"
    # a unique name per night: generateName, which needs `kubectl create` (apply ignores it)
    assert "name" not in template["metadata"] and template["metadata"]["generateName"].endswith("-")
    label = template["metadata"]["labels"]["app.kubernetes.io/name"]

    assert cron["spec"]["schedule"].split()[2:] == ["*", "*", "*"], "runs every day"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = "\n".join(container.get("command", []) + container.get("args", []))
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (key,) = configmap["data"]
    assert f"kubectl create -f {mount['mountPath']}/{key}" in script
    assert label in script, "the active-run check must select the nightly RayJobs' label"

    # RBAC: the CronJob's ServiceAccount may list/create RayJobs, through this Role
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"]} in binding["subjects"]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"get", "list", "create", "delete"} <= set(rule["verbs"])


# ------------------------------------------------------------- job command lines
# (file, minimum number of `python -m jobs.X` commands it must hold, full parse?)
COMMAND_SOURCES = [
    ("infra/kuberay/rayjob-infer.yaml", 1, True),
    ("infra/kuberay/rayjob-train.yaml", 1, True),
    ("infra/kuberay/cronjob-nightly.yaml", 1, True),
    ("infra/kuberay/raycluster.yaml", 0, True),
    ("infra/ray/cluster-aws.yaml", 0, True),
    ("infra/ray/runtime-env.yaml", 0, True),
    ("infra/RUNBOOK.md", 7, True),
    ("README.md", 5, False),  # the README elides arguments (`python -m jobs.infer ...`)
]


@pytest.mark.parametrize("rel,minimum,full", COMMAND_SOURCES, ids=[c[0] for c in COMMAND_SOURCES])
def test_job_command_lines_use_existing_jobs_and_flags(rel, minimum, full):
    commands = job_commands(os.path.join(ROOT, rel))
    assert len(commands) >= minimum, f"{rel}: found {len(commands)} `python -m jobs.X` commands, expected >= {minimum}"
    for module, argv in commands:
        check_flags(module, argv, rel)
        if full:
            check_full_parse(module, argv, rel)


def test_command_check_rejects_unknown_and_abbreviated_flags():
    # the checks above can fail: an unknown flag, an abbreviation argparse would accept,
    # a missing module, and a missing required flag
    with pytest.raises(AssertionError, match="--num-actor"):
        check_flags("jobs.infer", ["--input", "a", "--num-actor", "2"], "t")
    with pytest.raises(AssertionError, match="--gpus"):
        check_flags("jobs.train", ["--data", "d", "--gpus"], "t")
    with pytest.raises(AssertionError, match="no such module"):
        job_parser("jobs.inference")
    with pytest.raises(pytest.fail.Exception, match="--weights"):
        check_full_parse("jobs.infer", ["--input", "a", "--output", "b"], "t")
    (cmd,) = commands_in_text("x `ray job submit -- python -m jobs.infer --input a \\\n  --full && echo` y", JOB_RE)
    assert cmd == ("jobs.infer", ["--input", "a", "--full"])


def test_every_job_parser_is_found():
    # the four entry points the docs use; each one's parser is reachable without running it
    for module, flag in [("jobs.infer", "--weights"), ("jobs.train", "--use-gpu"),
                         ("jobs.evaluate", "--pred"), ("jobs.synthetic", "--images")]:
        assert flag in {s for a in job_parser(module)._actions for s in a.option_strings}, module


def test_ray_job_cli_commands_in_runbook_are_valid():
    import click
    from ray.dashboard.modules.job.cli import job_cli_group

    commands = commands_in_text(read(RUNBOOK), RAY_JOB_RE)
    assert len(commands) >= 7
    submits = 0
    for sub, argv in commands:
        assert sub in job_cli_group.commands, f"RUNBOOK: `ray job {sub}` does not exist"
        try:
            job_cli_group.commands[sub].make_context(sub, list(argv))
        except click.UsageError as e:
            pytest.fail(f"RUNBOOK: `ray job {sub} {shlex.join(argv)}`: {e}")
        if sub == "submit":
            submits += 1
            # the job code comes from the checkout, the compiled mrcnn from the image
            assert "--working-dir" in argv and argv[argv.index("--working-dir") + 1] == "."
            assert "--runtime-env" in argv and argv[argv.index("--runtime-env") + 1] == "infra/ray/runtime-env.yaml"
    assert submits >= 3


def test_working_dir_upload_leaves_out_mrcnn_so_the_image_build_is_used():
    # Ray's own packaging of `--working-dir .` with the runtime env's excludes
    from ray._private.runtime_env.packaging import _zip_files

    env = yaml.safe_load(read(RUNTIME_ENV))
    assert set(env) <= {"excludes", "env_vars"}, "the runtime env must not replace the image's packages"
    assert not [k for k in env.get("env_vars", {}) if SECRET_NAME.search(k)]
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mrcnn-infra-test-{os.getpid()}.zip")
    try:
        _zip_files(ROOT, env["excludes"], out, include_gitignore=True)
        names = zipfile.ZipFile(out).namelist()
    finally:
        if os.path.exists(out):
            os.remove(out)
    assert "jobs/infer/__main__.py" in names and "jobs/train/__main__.py" in names
    assert not [n for n in names if n.split("/")[0] == "mrcnn"], "the upload would shadow the image's compiled mrcnn"


# ---------------------------------------------------------------------- Dockerfile
def _dockerfile():
    text = re.sub(r"\\\n", " ", read(DOCKERFILE))
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _resolve_args(line, args):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), line)


def test_dockerfile_base_images_match_torch_cuda_and_python():
    lines = _dockerfile()
    args = dict(re.match(r"ARG (\w+)=(\S+)", l).groups() for l in lines if re.match(r"ARG \w+=", l))
    froms = [_resolve_args(l, args).split()[1] for l in lines if l.startswith("FROM ")]
    assert len(froms) == 2, froms
    build, runtime = froms
    m_build = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(cudnn-)?devel-ubuntu[\d.]+", build)
    m_run = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(cudnn-)?runtime-ubuntu[\d.]+", runtime)
    assert m_build and m_run, froms
    assert build.split(":")[1].split("-")[0] == runtime.split(":")[1].split("-")[0], "build and runtime CUDA differ"
    cuda = f"{m_build.group(1)}.{m_build.group(2)}"

    # torch's CUDA build, read from the installed torch without importing it, and the
    # CUDA toolkit that constraints.txt pins alongside it
    torch_dir = os.path.dirname(importlib.util.find_spec("torch").origin)
    torch_cuda = re.search(r"^cuda: .*= '([\d.]+)'", read(os.path.join(torch_dir, "version.py")), re.M).group(1)
    toolkit = ".".join(pins()["cuda-toolkit"].split(".")[:2])
    assert cuda == torch_cuda == toolkit, f"image CUDA {cuda}, torch built for {torch_cuda}, constraints cuda-toolkit {toolkit}"

    # Python: constraints.txt is a freeze of the environment the tests run in
    py = args["PYTHON_VERSION"]
    assert py == f"{sys.version_info.major}.{sys.version_info.minor}", \
        f"image Python {py}, constraints.txt frozen from Python {sys.version_info.major}.{sys.version_info.minor}"
    assert all(f"python${{PYTHON_VERSION}}" in l for l in lines if "apt-get install" in l and "python" in l)


def test_dockerfile_installs_pinned_versions_and_builds_cuda_kernels_for_four_archs():
    lines = _dockerfile()
    text = "\n".join(lines)
    pip_installs = [seg for l in lines for seg in re.split(r"&&", l) if re.search(r"\bpip install\b", seg)]
    assert len(pip_installs) >= 4
    for seg in pip_installs:
        assert re.search(r"(-c|--constraint)\s+\S*constraints\.txt", seg), f"unpinned install: {seg.strip()}"
    # any version written in the Dockerfile itself agrees with constraints.txt
    for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([\w.+\-]+)", text):
        assert pins().get(re.sub(r"[-_.]+", "-", name).lower()) == version, f"{name}=={version} in the Dockerfile"
    archs = re.findall(r"TORCH_CUDA_ARCH_LIST=\"?([^\"\s]+)\"?", text)
    assert archs and all(a.split(";") == ARCHS for a in archs), archs
    assert re.search(r"MRCNN_WITH_CUDA=1\b", text)
    install = [i for i, l in enumerate(lines) if re.search(r"pip install -c constraints\.txt --no-build-isolation \.(\s|$)", l)]
    assert install, "the project is not installed with --no-build-isolation ."
    verify = [i for i, l in enumerate(lines) if "import mrcnn.ops; assert mrcnn.ops.WITH_CUDA" in l]
    assert verify and verify[0] >= install[0], "the CUDA build is not verified at image build time"
    runtime_from = max(i for i, l in enumerate(lines) if l.startswith("FROM "))
    assert verify[-1] > runtime_from, "the final image itself is not verified"
    assert any("check_pins.py" in l and "constraints.txt" in l for l in lines)
    assert "COPY --from=build /opt/venv /opt/venv" in lines


def test_dockerignore_keeps_what_the_image_copies():
    ignore = read(os.path.join(ROOT, ".dockerignore")).splitlines()
    copied = [l.split()[1:-1] for l in _dockerfile() if l.startswith("COPY ") and "--from" not in l]
    for sources in copied:
        for src in sources:
            assert f"!{src}" in ignore, f".dockerignore drops {src}, which the Dockerfile copies"


def test_check_pins_accepts_the_pinned_environment_and_names_a_mismatch(tmp_path):
    script = os.path.join(INFRA, "docker", "check_pins.py")
    ok = subprocess.run([sys.executable, script, os.path.join(ROOT, "constraints.txt")], capture_output=True, text=True)
    assert ok.returncode == 0, f"this environment is not the pinned one: {ok.stderr}"
    wrong = tmp_path / "constraints.txt"
    wrong.write_text(read(os.path.join(ROOT, "constraints.txt")).replace(f"pyarrow=={pins()['pyarrow']}", "pyarrow==1.0.0"))
    bad = subprocess.run([sys.executable, script, str(wrong)], capture_output=True, text=True)
    assert bad.returncode == 1 and "pyarrow" in bad.stderr and "1.0.0" in bad.stderr


# ---------------------------------------------------------------------- credentials
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|SESSION_KEY", re.I)
SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}\b"),                       # AWS access key ids
    re.compile(r"aws_?secret_?access_?key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", re.I),       # key = value
    re.compile(r"aws_?session_?token\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{20,}", re.I),
    re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),                  # 40-char secret key shape
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def secrets_in(text):
    return [m.group(0) for rx in SECRET_TEXT for m in rx.finditer(text)]


def _env_entries(obj):
    if isinstance(obj, dict):
        if isinstance(obj.get("env"), list):
            yield from obj["env"]
        for v in obj.values():
            yield from _env_entries(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _env_entries(v)


def test_no_credentials_in_infra():
    files = [os.path.join(dp, n) for dp, _, ns in os.walk(INFRA) for n in ns] + [os.path.join(ROOT, ".dockerignore")]
    assert len(files) >= 10
    for path in files:
        found = secrets_in(read(path))
        assert not found, f"{os.path.relpath(path, ROOT)}: looks like a credential: {found}"
    envs = 0
    for rel in EXPECTED_MANIFESTS:
        for doc in load_docs(os.path.join(INFRA, rel)):
            for d in [doc] + list(embedded_docs(doc)):
                for entry in _env_entries(d):
                    envs += 1
                    if SECRET_NAME.search(entry["name"]):
                        assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], \
                            f"{rel}: {entry['name']} must come from a Secret (valueFrom.secretKeyRef)"
    assert envs >= 20
    # pods reach S3 through the IRSA-annotated ServiceAccount
    sa = load_docs(os.path.join(KUBERAY, "raycluster.yaml"))[0]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for _, spec in _ray_clusters():
        for g in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            assert g["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_credential_scan_finds_planted_secrets():
    # assembled here so that this file itself holds no credential-shaped literal
    key_id = "AKIA" + "Q" * 4 + "7" * 12
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCY" + "EXAMPLEKEY"
    assert secrets_in(f"id: {key_id}") == [key_id]
    assert secrets_in(f"aws_secret_access_key = {secret}")
    assert secrets_in(f"- {{name: X, value: {secret}}}")
    assert not secrets_in("image: 123456789012.dkr.ecr.us-west-2.amazonaws.com/mrcnn-batch:0.1.0")


# ------------------------------------------------------------- bench/gpu_check.sh
GPU_CHECK = os.path.join(ROOT, "bench", "gpu_check.sh")
GPU_STEPS = {  # step -> what a dry run without a GPU reports: PASS (runs on a CPU) or SKIP (needs CUDA)
    "check": {"wheels": "SKIP", "env": "PASS", "build": "BUILT", "tests-cuda-build": "PASS", "tests-ops": "SKIP",
              "tests-model": "SKIP", "exif-nvjpeg": "SKIP", "sanitizer": "SKIP", "sync-count": "SKIP",
              "bf16-check": "SKIP", "files": "PASS"},
    "bench": {"wheels": "SKIP", "env": "PASS", "extension": "BUILT", "roi-align": "SKIP", "model": "SKIP",
              "train-speed": "SKIP", "pipeline-640": "SKIP", "pipeline-12mp": "SKIP", "postprocess": "SKIP",
              "bf16-speed": "SKIP", "files": "PASS"},
}


def _summary_rows(summary):
    """{step: (status, budget, note)} of the summary's table (detail lines are indented)."""
    rows = {}
    for line in summary.splitlines():
        m = re.match(r"([\w-]+)\s+(PASS|FAIL|SKIP)\s+([\d.]+)\s+(\d+)\s+(.*)$", line)
        if m:
            rows[m.group(1)] = (m.group(2), int(m.group(4)), m.group(5))
    return rows


@pytest.mark.parametrize("mode", ["check", "bench"])
def test_gpu_check_dry_run_lists_every_step_and_fits_the_device_limits(mode, tmp_path):
    import time

    import torch

    import mrcnn.ops

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("GPU_CHECK_DEADLINE", None)
    t0 = time.monotonic()
    run = subprocess.run(["bash", GPU_CHECK, mode, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    took = time.monotonic() - t0
    assert run.returncode == 0, f"gpu_check.sh {mode} --dry-run exited {run.returncode}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
    assert took < 60, f"the dry run took {took:.0f} s (CI budget: under a minute)"
    summary = (out / "summary.txt").read_text()
    assert run.stdout.rstrip().endswith(summary.rstrip()), "the summary is not the last thing printed"
    rows = _summary_rows(summary)
    assert list(rows) == list(GPU_STEPS[mode]), f"steps in the summary: {list(rows)}"
    built = "PASS" if mrcnn.ops.WITH_CUDA else "SKIP"  # an extension with CUDA kernels is detected, not rebuilt
    reason = "dry run" if torch.cuda.is_available() else "no CUDA device"
    for step, expected in GPU_STEPS[mode].items():
        status, _, note = rows[step]
        assert status == (built if expected == "BUILT" else expected), f"{step}: {status} ({note})"
        if expected == "SKIP" and step != "wheels":
            assert note.startswith(reason), f"{step}: skipped for another reason: {note}"
    budgets = int(re.search(r"budgets sum to (\d+) s", summary).group(1))
    assert budgets == sum(b for _, b, _ in rows.values()) and budgets < 330, "step budgets must sum to < 330 s"
    assert re.search(r"^RESULT: PASS", summary, re.M)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, f"{len(files)} files in OUT, at most 8 come back from the device: {files}"
    assert all(p.parent == out for p in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)


def test_gpu_check_runs_whole_test_files():
    # a -k filter over several files would drop whole tests unseen: -k only with one named file
    text = re.sub(r"\\\n", " ", read(GPU_CHECK))
    calls = [line for line in text.splitlines() if "pytest" in line and not line.lstrip().startswith("#")]
    assert len(calls) >= 3
    for line in calls:
        line = line.split("pytest", 1)[1]  # pytest's own options (not timeout -k)
        if re.search(r"(^|\s)-k(\s|=|$)", line):
            files = re.findall(r"tests/test_\w+\.py", line)
            assert len(files) == 1 and not re.search(r"\$\{?(files|@|\*)", line), f"-k over a file list: {line.strip()}"
    # the groups of test files are whole files, and the CUDA-only EXIF test runs among them
    groups = re.findall(r"run_step (tests-[\w-]+) \d+ \"tests_group \d ([^\"]+)\"", text)
    assert {name for name, _ in groups} == {"tests-cuda-build", "tests-ops", "tests-model"}
    listed = " ".join(files for _, files in groups).split()
    assert all(re.fullmatch(r"tests/test_\w+\.py", f) for f in listed), listed
    assert "tests/test_infer_sized_decode.py" in listed and "tests/test_roi_align_cuda.py" in listed
