"""The comparison page at `/`: static files served by the service itself, no build step, nothing
fetched from elsewhere (the Content-Security-Policy says so to the browser too)."""
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# Everything from this origin only; images may also be the page's own data: and blob: URLs (the
# photo being classified, and what each model saw). No inline script or style.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)
static_files = StaticFiles(directory=STATIC)


@router.get("/")
@router.head("/")
async def comparison_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={
        "Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"})
