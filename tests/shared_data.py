"""Where the tests find the project's real data (``../shared/data``, never committed):
``$FERROQUANT_SHARED_DATA`` or the directory beside the repository. Tests that need it skip
when it is absent."""

from ferroquant.models import shared_data_root

DATA = shared_data_root()
STORIES = DATA / "models" / "stories260K"
TEXT = DATA / "text"
