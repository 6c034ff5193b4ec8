"""`hopwatch import`: existing checks (Postman collections, blackbox_exporter modules) turned
into flow files, with everything that could not be translated listed, never dropped."""
