"""The generated stubs. Their messages live in a descriptor pool of their own, not protobuf's
default one: tritonclient's stubs define the same `inference.*` names, and the default pool refuses
a second definition of a name, so both could not be imported in one process (a test, a tool)."""
from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
