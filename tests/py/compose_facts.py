"""Prints the facts of compose.yaml the deploy test checks, as JSON (PyYAML parses it as
docker compose does before interpolating variables)."""
import json
import sys

import yaml

with open(sys.argv[1]) as f:
    doc = yaml.safe_load(f)
services = doc["services"]
facts = {
    "services": sorted(services),
    "commands": {name: s.get("command") for name, s in services.items()},
    "restart": {name: s.get("restart") for name, s in services.items()},
    "depends_on": {
        name: s.get("depends_on") if isinstance(s.get("depends_on"), dict)
        else {d: {} for d in s.get("depends_on", [])}
        for name, s in services.items()
    },
    "nats_user": {
        name: (s.get("environment") or {}).get("CLAWBUS__NATS__USER")
        for name, s in services.items()
    },
    "nats_env": sorted((services["nats"].get("environment") or {}).keys()),
    "nats_volumes": services["nats"].get("volumes", []),
}
print(json.dumps(facts))
