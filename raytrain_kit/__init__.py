"""raytrain-kit."""

import time as _time

# When the kit was first imported (the console script's first line), and this process's CPU
# seconds by then: where this Python interpreter started, for the start-up timeline
# (`launch._process_started`). First here, before anything heavy is imported.
IMPORTED_AT = (_time.time(), _time.process_time())
