"""Admission as the API server does it, for the parts our manifests configure.

CEL is evaluated with two independent implementations (cel-python, and the Rust `cel` crate
through common-expression-language); every result must agree, so a quirk of one cannot make a
test pass. The expressions stay within standard CEL + has()/in/size()/exists()/all(), which is
what Kubernetes' CEL environment evaluates the same way.

Selector and rule matching follow the API server's semantics: a webhook or policy applies when
the operation/resource rule, namespaceSelector and objectSelector all match; then match
conditions (an error counts as a failure and failurePolicy decides); then validations.
"""

import celpy
import cel as rust_cel

ERROR = "error"


class _Cel:
    def __init__(self):
        self.env = celpy.Environment()
        self.cache = {}

    def _py(self, expr, activation):
        if expr not in self.cache:
            self.cache[expr] = self.env.program(self.env.compile(expr))
        try:
            out = self.cache[expr].evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
        except celpy.CELEvalError:
            return ERROR
        if isinstance(out, celpy.CELEvalError):
            return ERROR
        return bool(out) if isinstance(out, celpy.celtypes.BoolType) else out

    @staticmethod
    def _rust(expr, activation):
        try:
            return rust_cel.evaluate(expr, activation)
        except Exception:  # the binding raises plain exceptions for CEL errors
            return ERROR

    def eval(self, expr, activation):
        a, b = self._py(expr, activation), self._rust(expr, activation)
        if a != b:
            raise AssertionError(f"CEL implementations disagree on {expr!r}: cel-python={a!r}, cel(rust)={b!r}")
        return a


CEL = _Cel()


def selector_matches(selector, labels):
    """metav1.LabelSelector semantics; a missing selector matches everything."""
    if selector is None:
        return True
    labels = labels or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _rule_matches(rules, operation, group="", version="v1", resource="pods"):
    for r in rules:
        ops = r.get("operations") or []
        if not ("*" in ops or operation in ops):
            continue
        if not ("*" in r.get("apiGroups", []) or group in r.get("apiGroups", [])):
            continue
        if not ("*" in r.get("apiVersions", []) or version in r.get("apiVersions", [])):
            continue
        if "*" in r.get("resources", []) or resource in r.get("resources", []):
            return True
    return False


def _activation(pod, operation):
    return {"object": pod, "request": {"operation": operation, "kind": {"group": "", "version": "v1", "kind": "Pod"}}}


def webhook_called(webhook, pod, namespace_labels, operation="CREATE"):
    """True: the API server sends the Pod to this webhook. "rejected": a match condition errored
    and failurePolicy is Fail. False: not sent."""
    if not _rule_matches(webhook["rules"], operation):
        return False
    if not selector_matches(webhook.get("namespaceSelector"), namespace_labels):
        return False
    if not selector_matches(webhook.get("objectSelector"), pod["metadata"].get("labels")):
        return False
    for mc in webhook.get("matchConditions") or []:
        out = CEL.eval(mc["expression"], _activation(pod, operation))
        if out == ERROR:
            return "rejected" if webhook.get("failurePolicy", "Fail") == "Fail" else False
        if out is not True:
            return False
    return True


def policy_decision(policy, binding, pod, namespace_labels, operation="CREATE"):
    """("admitted", None) or ("denied", message) for a ValidatingAdmissionPolicy + binding."""
    spec = policy["spec"]
    mc = spec.get("matchConstraints") or {}
    if binding["spec"]["policyName"] != policy["metadata"]["name"]:
        return ("admitted", None)
    for constraints in (mc, binding["spec"].get("matchResources") or {}):
        if constraints.get("resourceRules") and not _rule_matches(constraints["resourceRules"], operation):
            return ("admitted", None)
        if not selector_matches(constraints.get("namespaceSelector"), namespace_labels):
            return ("admitted", None)
        if not selector_matches(constraints.get("objectSelector"), pod["metadata"].get("labels")):
            return ("admitted", None)
    fail = spec.get("failurePolicy", "Fail") == "Fail"
    for cond in spec.get("matchConditions") or []:
        out = CEL.eval(cond["expression"], _activation(pod, operation))
        if out == ERROR:
            if fail:
                return ("denied", f"match condition {cond['name']} errored")
            return ("admitted", None)
        if out is not True:
            return ("admitted", None)
    deny = "Deny" in binding["spec"].get("validationActions", [])
    for v in spec["validations"]:
        out = CEL.eval(v["expression"], _activation(pod, operation))
        if out == ERROR and not fail:
            continue
        if out is not True and deny:
            return ("denied", v.get("message") or "expression errored")
    return ("admitted", None)
