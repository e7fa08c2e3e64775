"""`samkit annotate`: the data engine's model-assisted annotation tool in the browser.

`Project` ties an images folder, an SQLite store and a model together; `create_app(project)` is the
FastAPI app; `export_project` / `import_annotations` move annotations to and from SA-1B and COCO files.
"""

from samkit.annotate.exchange import export_project, import_annotations
from samkit.annotate.project import Project, Prompt
from samkit.annotate.store import Store

__all__ = ["Project", "Prompt", "Store", "export_project", "import_annotations"]
