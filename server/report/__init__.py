"""report.html: the page and its sections."""
