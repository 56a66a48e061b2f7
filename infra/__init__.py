"""Infrastructure as code for the endpoint stack (issue 6)."""
