"""`muse reproduce`'s library: published numbers (`published`) and the results page (`results_page`)."""
