"""Capture: every served prediction, human feedback, and a sample of input images, as files
that serving writes and monitoring, data and the pipeline read.

Layout under the capture root (a path or a filesystem URI):

    predictions/date=YYYY-MM-DD/version=vN/part-<unix ms>-<id>.parquet
    feedback/date=YYYY-MM-DD/part-<unix ms>-<id>.parquet
    images/date=YYYY-MM-DD/version=vN/<request_id>.<ext>

`schema` holds the record layout and file naming, `writer.CaptureWriter` writes (never on
the request path), `store.CaptureStore` reads.
"""
