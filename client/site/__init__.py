"""A hospital's site folder: reading, checking and loading it (one acceptance path per patient),
and the session a query opens."""
