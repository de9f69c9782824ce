"""The ``kt`` command line and (issue 6) the HTTP client of the vfm-kt service."""
