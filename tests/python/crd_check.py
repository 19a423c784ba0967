"""Checks documents against the LoraAdapter CustomResourceDefinition's OpenAPI schema with a
JSON-schema validator, and reads the Kubernetes manifests of deploy/kubernetes.

    crd_check.py validate CRD_YAML
        reads a JSON list of documents on stdin; prints a JSON list: for each, null when the
        schema accepts it, else the validator's first complaint
    crd_check.py documents FILE...
        prints every YAML document of the files as one JSON list
"""

import json
import sys

import jsonschema
import yaml


def schema_of(crd_path: str) -> dict:
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def validate(crd_path: str) -> None:
    schema = schema_of(crd_path)
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    out = []
    for doc in json.load(sys.stdin):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        out.append(None if not errors else f"{'.'.join(map(str, errors[0].path)) or '(root)'}: {errors[0].message}")
    print(json.dumps(out))


def documents(paths) -> None:
    docs = []
    for path in paths:
        with open(path) as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d is not None)
    print(json.dumps(docs))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "validate":
        validate(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "documents":
        documents(sys.argv[2:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
