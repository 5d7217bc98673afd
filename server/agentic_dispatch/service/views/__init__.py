"""Views: status, watch, logs, diff, insights and resources, from the records and the index alone."""
