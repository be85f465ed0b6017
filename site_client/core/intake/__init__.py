"""DICOM intake at the site: index, folder import, PACS receiver, labels, dataset cache."""
