"""`python -m contract`: print the JSON schema of metadata.json."""
import json

from contract.metadata import ModelMetadata

print(json.dumps(ModelMetadata.model_json_schema(), indent=2))
