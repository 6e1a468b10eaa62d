"""An offline, self-contained HTML viewer of a capture file (`latentmas view`).

`page.build_page` turns a `CaptureReader` into one HTML string (script, style and data
inlined); `data` encodes the hand-offs compactly; `viewer.js` draws them on a canvas.
"""
