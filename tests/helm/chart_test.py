#!/usr/bin/env python3
"""Tests of the kiln chart's rendered output (no cluster needed).

    python3 tests/helm/chart_test.py HELM

Renders charts/kiln with `helm template` under several value sets and checks what the
operator and the cluster rely on: RBAC equal to operator/src/rbac.rs, the Deployment's
flags, probes, security context and service account, the image's entrypoint (Dockerfile)
against the container's command, selectors of the Service, PDB and ServiceMonitor, the
Lease, namespaced mode, the values schema rejecting bad values, and the Grafana dashboard.
Prints "N passed, N failed"; exits non-zero on a failure.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
CHART = os.path.join(REPO, "charts", "kiln")
HELM = sys.argv[1] if len(sys.argv) > 1 else "helm"
NS = "kiln-system"
RELEASE = "kiln"


def render(*values_files, sets=(), namespace=NS, release=RELEASE, expect_fail=False):
    cmd = [HELM, "template", release, CHART, "--namespace", namespace]
    for f in values_files:
        cmd += ["-f", os.path.join(HERE, "values", f)]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if expect_fail:
        assert p.returncode != 0, f"helm template {' '.join(cmd[2:])} succeeded, expected a failure"
        return p.stderr
    assert p.returncode == 0, f"helm template failed: {p.stderr}"
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def find(docs, kind, name=None, namespace=None):
    out = [
        d
        for d in docs
        if d["kind"] == kind
        and (name is None or d["metadata"]["name"] == name)
        and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]
    return out


def one(docs, kind, name=None, namespace=None):
    found = find(docs, kind, name, namespace)
    assert len(found) == 1, f"want one {kind} {name or ''} in {namespace or 'any namespace'}, found {len(found)}"
    return found[0]


def container(docs):
    dep = one(docs, "Deployment")
    cs = dep["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1, "one container"
    return dep, cs[0]


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def rule_set(rules):
    """Normalises RBAC rules into (group, resource, verb) triples."""
    return {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}


def expected_rbac():
    """The operator's own list of rules (operator/src/rbac.rs, `RULES`), split as the chart
    grants them: on cluster-scoped nodes, on the leader-election Lease, and on the
    namespaced objects of the watched namespaces."""
    with open(os.path.join(REPO, "operator", "src", "rbac.rs")) as f:
        text = f.read()
    body = re.search(r"pub const RULES: &\[Rule\] = &\[(.*?)\n\];", text, re.S)
    assert body, "operator/src/rbac.rs has no `pub const RULES: &[Rule]`"
    rules = []
    for m in re.finditer(r"Rule \{(.*?)\}", body.group(1), re.S):
        fields = {
            k: re.findall(r'"([^"]*)"', v)
            for k, v in re.findall(r"(api_groups|resources|verbs): &\[(.*?)\]", m.group(1), re.S)
        }
        rules.append({"apiGroups": fields["api_groups"], "resources": fields["resources"], "verbs": fields["verbs"]})
    assert rules, "no rules in operator/src/rbac.rs"
    triples = rule_set(rules)
    split = {
        "cluster": {t for t in triples if t[1] == "nodes"},
        "lease": {t for t in triples if t[1] == "leases"},
    }
    split["watched"] = triples - split["cluster"] - split["lease"]
    return split


def diff(got, exp):
    return f"extra {sorted(got - exp)}, missing {sorted(exp - got)}"


def dockerfile():
    """ENTRYPOINT (exec form), USER and PATH directories of the Dockerfile's runtime stage."""
    with open(os.path.join(REPO, "Dockerfile")) as f:
        text = f.read()
    last = text[text.rfind("\nFROM ") :]
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", last, re.M)
    assert m, "the runtime stage has an exec-form ENTRYPOINT"
    user = re.search(r"^USER\s+(\S+)\s*$", last, re.M)
    assert user, "the runtime stage sets USER"
    path = re.search(r"^ENV\s+PATH=(\S+)\s*$", last, re.M)
    assert path, "the runtime stage sets PATH"
    return json.loads(m.group(1)), user.group(1), path.group(1).split(":")


def operator_config_fields():
    """Field names (camelCase) of the operator's OperatorConfig, NodeLabel and
    NetworkPolicyConfig structs, read from their sources; None while config.rs does not
    exist."""
    path = os.path.join(REPO, "operator", "src", "config.rs")
    if not os.path.exists(path):
        return None

    def fields(file, struct):
        with open(os.path.join(REPO, "operator", "src", file)) as f:
            text = f.read()
        m = re.search(r"pub struct " + struct + r" \{(.*?)\n\}", text, re.S)
        assert m, f"operator/src/{file} has no struct {struct}"
        names = re.findall(r"^\s*pub (\w+):", m.group(1), re.M)
        return {re.sub(r"_(\w)", lambda c: c.group(1).upper(), n) for n in names}

    return {
        "OperatorConfig": fields("config.rs", "OperatorConfig"),
        "NodeLabel": fields("config.rs", "NodeLabel"),
        "NetworkPolicyConfig": fields("netpol.rs", "NetworkPolicyConfig"),
    }


def check_operator_config(config):
    """The rendered config file only uses fields the operator knows (it denies the rest)."""
    known = operator_config_fields()
    if known is None:
        return
    unknown = set(config) - known["OperatorConfig"]
    assert not unknown, f"config fields the operator does not know: {sorted(unknown)}"
    for label in config.get("spotNodeLabels", []) + config.get("onDemandNodeLabels", []):
        assert set(label) <= known["NodeLabel"], label
    assert set(config.get("networkPolicy", {})) <= known["NetworkPolicyConfig"], config


# --- tests -------------------------------------------------------------------------------


def test_default_objects():
    docs = render()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted(
        [
            ("ClusterRole", "kiln-operator"),
            ("ClusterRole", "kiln-computejobs-view"),
            ("ClusterRole", "kiln-computejobs-edit"),
            ("ClusterRoleBinding", "kiln-operator"),
            ("ConfigMap", "kiln-operator"),
            ("Deployment", "kiln-operator"),
            ("Lease", "kiln-operator"),
            ("PodDisruptionBudget", "kiln-operator"),
            ("Role", "kiln-operator-leader-election"),
            ("RoleBinding", "kiln-operator-leader-election"),
            ("Service", "kiln-operator-metrics"),
            ("ServiceAccount", "kiln-operator"),
        ]
    ), kinds
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for d in docs:
        labels = d["metadata"]["labels"]
        # The end-to-end test finds leftovers after `helm uninstall` by this label.
        assert labels["app.kubernetes.io/instance"] == RELEASE, d["metadata"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if d["kind"] in cluster_scoped:
            assert "namespace" not in d["metadata"], d["metadata"]
        else:
            assert d["metadata"]["namespace"] == NS, d["metadata"]


def test_rbac_is_exactly_what_the_operator_uses():
    want = expected_rbac()
    docs = render()
    role = one(docs, "ClusterRole", "kiln-operator")
    got, exp = rule_set(role["rules"]), want["watched"] | want["cluster"]
    assert got == exp, f"ClusterRole: {diff(got, exp)}"
    lease = one(docs, "Role", "kiln-operator-leader-election", NS)
    got = rule_set(lease["rules"])
    assert got == want["lease"], f"lease Role: {diff(got, want['lease'])}"
    # Reading and updating are limited to the operator's own Lease (create cannot be).
    for r in lease["rules"]:
        if set(r["verbs"]) - {"create"}:
            assert r.get("resourceNames") == ["kiln-operator"], r
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    for kind, name in [("ClusterRoleBinding", "kiln-operator"), ("RoleBinding", "kiln-operator-leader-election")]:
        b = one(docs, kind, name)
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NS}], b["subjects"]
        ref_kind = "ClusterRole" if kind == "ClusterRoleBinding" else "Role"
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": ref_kind, "name": name}
    for r in role["rules"] + lease["rules"]:
        assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"], r


def test_no_mode_lists_or_watches_secrets():
    # The operator reads only the Secrets it made, by name: in neither mode may it list or
    # watch Secrets, which would let it read every Secret it can see.
    for values in [(), ("namespaced.yaml",)]:
        for d in render(*values):
            if d["kind"] not in ("ClusterRole", "Role"):
                continue
            for r in d.get("rules", []):
                if "secrets" in r["resources"] and "" in r["apiGroups"]:
                    assert not {"list", "watch"} & set(r["verbs"]), (d["metadata"]["name"], r)


def test_namespaced_mode_has_a_role_per_namespace():
    want = expected_rbac()
    docs = render("namespaced.yaml")
    for ns in ["team-a", "team-b"]:
        role = one(docs, "Role", "kiln-operator", ns)
        got = rule_set(role["rules"])
        assert got == want["watched"], f"Role in {ns}: {diff(got, want['watched'])}"
        b = one(docs, "RoleBinding", "kiln-operator", ns)
        assert b["roleRef"]["kind"] == "Role" and b["subjects"][0]["namespace"] == NS
    cr = one(docs, "ClusterRole", "kiln-operator")
    assert rule_set(cr["rules"]) == want["cluster"], cr["rules"]
    _, c = container(docs)
    assert env_of(c)["KILN_WATCH_NAMESPACES"]["value"] == "team-a,team-b"
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["operator.yaml"])
    assert config == {
        "spotNodeLabels": [{"key": "node.example.com/lifecycle", "values": ["spot", "preemptible"]}],
        "onDemandNodeLabels": [{"key": "node.example.com/lifecycle", "values": ["on-demand"]}],
        "spotTolerations": [],
        "maxDriverRestarts": 1,
        "progressIntervalSeconds": 10,
        "networkPolicy": config["networkPolicy"],
    }, config
    check_operator_config(config)
    # All namespaces: the variable is not set at all (empty = all).
    _, c = container(render())
    assert "KILN_WATCH_NAMESPACES" not in env_of(c)


def test_deployment_runs_the_operator_as_the_contract_says():
    docs = render()
    dep, c = container(docs)
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    assert spec["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert spec.get("automountServiceAccountToken") is True
    assert c["args"][0] == "operator", c["args"]
    assert "--lease-name=kiln-operator" in c["args"], c["args"]
    env = env_of(c)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["KILN_LEADER_ELECT"]["value"] == "true"
    assert env["KILN_LEASE_NAMESPACE"]["value"] == NS
    assert env["KILN_METRICS_BIND"]["value"] == "0.0.0.0:8080"
    assert env["KILN_LOG_FORMAT"]["value"] in ("text", "json")
    # Every variable and flag the chart sets is one `kiln operator` reads.
    cli = os.path.join(REPO, "kiln", "src", "operator.rs")
    if os.path.exists(cli):
        with open(cli) as f:
            source = f.read()
        read = set(re.findall(r'env = "([A-Z_]+)"', source))
        flags = {"--" + f.replace("_", "-") for f in re.findall(r"^\s*(?:pub )?(\w+): ", source, re.M)}
        unread = {n for n in env if n.startswith("KILN_") or n == "POD_NAME"} - read
        assert not unread, f"kiln operator reads none of {sorted(unread)} (it reads {sorted(read)})"
        for a in c["args"][1:]:
            assert a.split("=")[0] in flags, f"kiln operator has no flag {a} ({sorted(flags)})"
    assert env["KILN_DEFAULT_IMAGE"]["value"] == c["image"] == "ghcr.io/kiln-dev/kiln:0.1.0"
    # The config file the operator reads is the ConfigMap's key, mounted.
    path = env["KILN_OPERATOR_CONFIG"]["value"]
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    cm = one(docs, "ConfigMap", vol["configMap"]["name"], NS)
    key = path[len(mount["mountPath"]) + 1 :]
    config = yaml.safe_load(cm["data"][key])
    assert {"key": "karpenter.sh/capacity-type", "values": ["spot"]} in config["spotNodeLabels"]
    assert {"key": "kiln.dev/spot", "operator": "Exists", "effect": "NoSchedule"} in config["spotTolerations"]
    assert config["onDemandNodeLabels"] == []
    # Each job's NetworkPolicy lets exactly this release's operator pods reach the driver.
    netpol = config["networkPolicy"]
    assert netpol["operatorNamespace"] == NS, netpol
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert netpol["operatorPodLabels"] == dep["spec"]["selector"]["matchLabels"], netpol
    assert netpol["operatorPodLabels"].items() <= pod_labels.items(), (netpol, pod_labels)
    check_operator_config(config)
    # Probes on the metrics port.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # Resources and a restricted security context.
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    psc, sc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # Config changes roll the pods.
    assert re.fullmatch(r"[0-9a-f]{64}", dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"])
    # Replicas spread over nodes by default; no spot toleration.
    assert "podAntiAffinity" in spec["affinity"]
    assert not spec.get("tolerations")


def operator_entrypoint():
    """The operator's `ENTRYPOINT` constant (the command of the pods it builds), or None
    while operator/src has none."""
    src = os.path.join(REPO, "operator", "src")
    for root, _, files in os.walk(src):
        for name in sorted(files):
            if name.endswith(".rs"):
                with open(os.path.join(root, name)) as f:
                    m = re.search(r"pub const ENTRYPOINT: &\[&str\] = &\[(.*?)\];", f.read(), re.S)
                if m:
                    return re.findall(r'"([^"]*)"', m.group(1))
    return None


def resolves_to(command, entrypoint, path):
    """Whether a container command runs the image's ENTRYPOINT program: the same path, or
    a bare name found on the image's PATH."""
    if not command:
        return True
    if "/" in command[0]:
        return command[0] == entrypoint[0]
    return any(os.path.join(d, command[0]) == entrypoint[0] for d in path)


def test_image_entrypoint_matches_the_pods():
    entrypoint, user, path = dockerfile()
    assert entrypoint == ["/usr/local/bin/kiln"], entrypoint
    docs = render()
    dep, c = container(docs)
    # The operator container starts the image's program with the `operator` subcommand.
    assert resolves_to(c.get("command"), entrypoint, path), (c.get("command"), entrypoint, path)
    argv = (c.get("command") or entrypoint) + c["args"]
    assert argv[1] == "operator", argv
    # ... with the very command the operator gives its job pods.
    op = operator_entrypoint()
    if op is not None:
        assert c.get("command") == op, f"chart runs {c.get('command')}, the operator's pods {op}"
        assert resolves_to(op, entrypoint, path), f"operator pods run {op}, the image {entrypoint} (PATH {path})"
    # The image's user is the pods'.
    uid = user.split(":")[0]
    spec = dep["spec"]["template"]["spec"]
    assert str(spec["securityContext"]["runAsUser"]) == uid, (user, spec["securityContext"])
    # The test cluster's node agent maps the program by file name to the workspace build.
    with open(os.path.join(REPO, "tests", "cluster", "node-agent.yaml")) as f:
        agent = yaml.safe_load(f)
    kiln_images = [i for i in agent["images"] if i["image"] in ("kiln:*", "ghcr.io/kiln-dev/kiln:*")]
    assert len(kiln_images) == 2, agent["images"]
    for i in kiln_images:
        assert os.path.basename(entrypoint[0]) in i["binaries"], i


def test_selectors_match_the_operator_pods():
    docs = render("namespaced.yaml")
    dep, c = container(docs)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel.items() <= pod_labels.items()
    # The selector names the operator component, so it never matches job pods.
    assert sel["app.kubernetes.io/component"] == "operator"
    svc = one(docs, "Service", "kiln-operator-metrics")
    assert svc["spec"]["selector"] == sel
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in c["ports"]}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == sel
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]
    sm = one(docs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NS]
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert dep["spec"]["replicas"] == 3
    assert env_of(c)["AWS_REGION"]["value"] == "eu-west-1"


def test_images():
    _, c = container(render("namespaced.yaml"))
    assert c["image"] == "ghcr.io/kiln-dev/kiln:0.1.0"
    assert env_of(c)["KILN_DEFAULT_IMAGE"]["value"] == "registry.example.com/kiln-jobs:1.2.3"
    _, c = container(render(sets=["image.tag=v9"]))
    assert c["image"] == env_of(c)["KILN_DEFAULT_IMAGE"]["value"] == "ghcr.io/kiln-dev/kiln:v9"
    _, c = container(render("test-cluster.yaml"))
    assert c["image"] == "kiln:dev" and env_of(c)["KILN_DEFAULT_IMAGE"]["value"] == "kiln:dev"


def test_lease_belongs_to_the_release():
    docs = render(sets=["operator.leaderElection.leaseName=my-lease"])
    lease = one(docs, "Lease", "my-lease", NS)
    assert lease["spec"] in ({}, None), "the chart sets no holder"
    _, c = container(docs)
    assert "--lease-name=my-lease" in c["args"], c["args"]
    role = one(docs, "Role", "kiln-operator-leader-election")
    assert ["my-lease"] in [r.get("resourceNames") for r in role["rules"]]


def test_minimal_mode():
    docs = render("minimal.yaml")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment"], kinds
    dep, c = container(docs)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "kiln"
    assert env_of(c)["KILN_LEADER_ELECT"]["value"] == "false"
    assert c["image"] == "ghcr.io/kiln-dev/kiln@sha256:" + "0" * 64


def test_release_name_and_namespace():
    docs = render(release="batch", namespace="data")
    assert one(docs, "Deployment")["metadata"]["name"] == "batch-kiln-operator"
    crb = one(docs, "ClusterRoleBinding")
    assert crb["subjects"][0] == {"kind": "ServiceAccount", "name": "batch-kiln-operator", "namespace": "data"}
    assert all(d["metadata"].get("namespace") in (None, "data") for d in docs)


def test_schema_rejects_bad_values():
    bad = [
        "operator.replicas=two",
        "operator.replicas=0",
        "image.pullPolicy=Sometimes",
        "typo=1",
        "operator.logFormat=xml",
        "watchNamespaces[0]=Not_A_Namespace",
        "placement.spotTolerations[0].operator=Maybe",
        "placement.spotNodeLabels[0].values=null",
        "operatorConfig.maxDriverRestart=1",
        "operatorConfig.crashLoopLimit=-1",
        "metrics.port=70000",
        "image.digest=latest",
    ]
    for s in bad:
        err = render(sets=[s], expect_fail=True)
        assert "schema" in err, f"{s}: {err}"
    # Two leaders-to-be without an election is refused by the template.
    err = render(sets=["operator.leaderElection.enabled=false"], expect_fail=True)
    assert "leaderElection" in err, err


def test_notes_render():
    # `helm template` renders NOTES.txt but never prints it: render it through a template
    # of a throwaway copy of the chart.
    with tempfile.TemporaryDirectory() as tmp:
        chart = os.path.join(tmp, "kiln")
        shutil.copytree(CHART, chart)
        with open(os.path.join(chart, "templates", "notes-under-test.yaml"), "w") as f:
            f.write('notes: |\n{{- include (print $.Template.BasePath "/NOTES.txt") . | nindent 2 }}\n')

        def notes(*sets):
            cmd = [HELM, "template", RELEASE, chart, "-n", NS, "--show-only", "templates/notes-under-test.yaml"]
            for s in sets:
                cmd += ["--set", s]
            p = subprocess.run(cmd, capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
            return yaml.safe_load(p.stdout)["notes"]

        text = notes()
        assert "reconciles ComputeJobs in all namespaces" in text, text
        assert "get lease kiln-operator" in text and "placement.spotNodeLabels" in text, text
        # The example the notes tell users to apply is one the project ships.
        examples = re.findall(r"/main/(manifests/[\w./-]+\.yaml)", text)
        assert examples, text
        for path in examples:
            assert os.path.isfile(os.path.join(REPO, path)), f"NOTES.txt names a missing {path}"
        assert "short name: kjob" in text, text
        text = notes("watchNamespaces={a,b}", "operator.replicas=1", "operator.leaderElection.enabled=false")
        assert "namespaces a, b" in text and "lease" not in text and "(1 replica)" in text, text


def check_schema(value, schema, at, problems):
    """A structural-schema check of `value` as the API server makes it for a CRD: types,
    unknown fields (strict field validation), required fields, enums, bounds and patterns.
    CEL rules (x-kubernetes-validations) are left to the server."""
    if value is None:
        if not schema.get("nullable"):
            problems.append(f"{at}: null")
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, (int, str)):
            problems.append(f"{at}: want int or string, got {value!r}")
        return
    t = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    if t in types and not isinstance(value, types[t]):
        problems.append(f"{at}: want {t}, got {value!r}")
        return
    if t in ("integer", "number") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        problems.append(f"{at}: want {t}, got {value!r}")
        return
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{at}: {value!r} not one of {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        problems.append(f"{at}: {value!r} does not match {schema['pattern']}")
    if "minimum" in schema and value < schema["minimum"] or "maximum" in schema and value > schema["maximum"]:
        problems.append(f"{at}: {value!r} out of range")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            if k not in value:
                problems.append(f"{at}: missing {k}")
        for k, v in value.items():
            if k in props:
                check_schema(v, props[k], f"{at}.{k}", problems)
            elif isinstance(schema.get("additionalProperties"), dict):
                check_schema(v, schema["additionalProperties"], f"{at}.{k}", problems)
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{at}: unknown field {k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            check_schema(v, schema["items"], f"{at}[{i}]", problems)


def test_examples_match_the_crd():
    with open(os.path.join(CHART, "crds", "computejob.yaml")) as f:
        crd = yaml.safe_load(f)
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    examples = os.path.join(REPO, "manifests", "examples")
    names = sorted(n for n in os.listdir(examples) if n.endswith(".yaml"))
    assert len(names) >= 3, names
    for name in names:
        with open(os.path.join(examples, name)) as f:
            job = yaml.safe_load(f)
        assert job["apiVersion"] == f"{crd['spec']['group']}/{version['name']}", name
        assert job["kind"] == crd["spec"]["names"]["kind"], name
        problems = []
        check_schema(job["spec"], schema, "spec", problems)
        assert not problems, f"{name}: {problems}"
        # On a cluster a relative path means nothing: every location is a URL or absolute.
        spec = job["spec"]
        uris = [i["uri"] for i in spec.get("inputs", [])] + [spec.get("output", {}).get("uri", "/")]
        relative = [u for u in uris if "://" not in u and not u.startswith("/")]
        assert not relative, f"{name}: relative locations {relative}"


def test_readme_job_is_a_shipped_example():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    jobs = [b for b in blocks if "kind: ComputeJob" in b]
    assert jobs, "the README shows a ComputeJob"
    examples = os.path.join(REPO, "manifests", "examples")
    shipped = []
    for name in sorted(os.listdir(examples)):
        with open(os.path.join(examples, name)) as f:
            text = f.read()
        shipped.append(text[text.index("apiVersion:") :])
    for job in jobs:
        assert job in shipped, "the README's ComputeJob is not one of manifests/examples/"


def test_grafana_dashboard():
    path = os.path.join(REPO, "manifests", "grafana", "kiln-dashboard.json")
    with open(path) as f:
        dash = json.load(f)
    assert dash["uid"] and dash["title"]
    panels = []
    for p in dash["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    listed = {}
    with open(os.path.join(HERE, "metrics.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, _type, _labels, owner = line.split()
                listed[name] = owner
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bkiln_[a-z_]+\b", exprs)}
    unknown = used - set(listed)
    assert not unknown, f"dashboard queries unknown metrics {sorted(unknown)} (tests/helm/metrics.txt)"
    # The operator's metrics are the ones it registers (prefix kiln_operator, counters get
    # _total).
    with open(os.path.join(REPO, "operator", "src", "metrics.rs")) as f:
        source = f.read()
    registered = set(re.findall(r'registry\.register\(\s*"([a-z_]+)"', source))
    assert 'with_prefix("kiln_operator")' in source
    for name, owner in listed.items():
        # Only the operator serves /metrics: a dashboard series nobody exports stays empty.
        assert owner == "operator", f"{name}: only the operator exports metrics"
        base = re.sub(r"_total$", "", name[len("kiln_operator_") :])
        assert base in registered, f"{name}: operator/src/metrics.rs registers {sorted(registered)}"
    # The losses panel explains every reason the operator labels a loss with.
    with open(os.path.join(REPO, "api", "src", "loss.rs")) as f:
        reasons = re.findall(r'LossReason::\w+ => "(\w+)"', f.read())
    assert len(reasons) >= 6, reasons
    losses = next(p for p in panels if "kiln_operator_executor_losses_total" in str(p.get("targets")))
    missing = [r for r in reasons if r not in losses["description"]]
    assert not missing, f"the executor-losses panel does not explain {missing}"
    for want in ["reconcile", "error", "phase", "loss", "replacement"]:
        assert any(want in (p.get("title", "") + json.dumps(p.get("targets", []))).lower() for p in panels), want
    for p in panels:
        if p.get("type") != "row":
            assert p.get("datasource", {}).get("uid") == "${datasource}", p["title"]


def main():
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_") and callable(f)]
    passed = failed = 0
    for name, f in tests:
        try:
            f()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report every failure, then exit non-zero
            failed += 1
            print(f"FAIL {name}: {e}")
            if os.environ.get("VERBOSE"):
                traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
