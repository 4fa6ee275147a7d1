"""bcc-desk: classify B-ALL peripheral blood smear images into an Excel report."""

__version__ = "0.1.0"
