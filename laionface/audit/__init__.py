"""What a run kept and dropped: the funnel (with its conservation check) and the HTML report."""
