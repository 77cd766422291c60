"""The Open Inference Protocol (KServe V2): wire models, codec and routes."""
from service.protocols.open_inference.repository import router as repository_router
from service.protocols.open_inference.routes import inference_router, router

__all__ = ["inference_router", "repository_router", "router"]
