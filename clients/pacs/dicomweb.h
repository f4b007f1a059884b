/* dicomweb.h — the HTTP side of medmoe-pacs: DICOMweb (QIDO-RS metadata,
 * WADO-RS retrieve, STOW-RS store) and Orthanc's REST change feed, over libcurl.
 *
 * One object per PACS; calls are blocking, bounded by the options' timeout and
 * abandoned early when *stop becomes nonzero (SIGTERM). Errors name the URL
 * path and the HTTP status or curl's reason; MM_EAGAIN marks what is worth
 * retrying (connection refused, timeouts, HTTP 5xx/429), MM_EPROTO a reply that
 * is not what DICOMweb promises, MM_ENOTFOUND a 404.
 *
 *     mm_dweb_options o; mm_dweb_options_default(&o);
 *     o.orthanc = "http://127.0.0.1:8042";
 *     mm_dweb *d = NULL;
 *     if (mm_dweb_new(&o, &d, err, sizeof err) != MM_OK) ...
 *     json_t *meta = NULL;   // the study's instances, DICOM JSON (PS3.18 F.2)
 *     mm_dweb_study_metadata(d, study_uid, &meta, err, sizeof err);
 *     mm_dweb_destroy(&d);
 */
#ifndef MM_DICOMWEB_H
#define MM_DICOMWEB_H

#include <jansson.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

typedef struct mm_dweb mm_dweb;

typedef struct mm_dweb_options {
    const char *orthanc;  /* Orthanc's REST root, e.g. http://127.0.0.1:8042 (the change feed) */
    const char *dicomweb; /* DICOMweb root; NULL: <orthanc>/dicom-web                      */
    const char *user;     /* HTTP basic auth user; NULL: none                               */
    const char *password; /* its password                                                   */
    const char *ca_file;  /* PEM CA bundle for https; NULL: the system's                    */
    long timeout_ms;      /* per request (default 30000)                                    */
    const volatile sig_atomic_t *stop; /* nonzero: abandon the request in flight (NULL: never) */
} mm_dweb_options;

void mm_dweb_options_default(mm_dweb_options *o);
/* Copies the options' strings. MM_EINVAL (no orthanc URL), MM_ENOMEM, MM_ERR (curl). */
int mm_dweb_new(const mm_dweb_options *o, mm_dweb **out, char *err, size_t errlen);
void mm_dweb_destroy(mm_dweb **d);

/* GET <orthanc><path> as JSON (the change feed: "/changes?since=N&limit=M",
 * "/studies/<id>"). *out: new reference, caller json_decref()s. */
int mm_dweb_rest_json(mm_dweb *d, const char *path, json_t **out, char *err, size_t errlen);

/* QIDO-RS/WADO-RS metadata of every instance of a study (optionally one
 * series): GET {dicomweb}/studies/{s}[/series/{se}]/metadata. An array. */
int mm_dweb_study_metadata(mm_dweb *d, const char *study, const char *series, json_t **out,
                           char *err, size_t errlen);

/* The SOP Instance UIDs of a study's instances that have the given one:
 * QIDO-RS GET {dicomweb}/studies/{s}/instances?SOPInstanceUID={uid}.
 * *found = 1 when the PACS holds it. */
int mm_dweb_instance_exists(mm_dweb *d, const char *study, const char *sop, int *found, char *err,
                            size_t errlen);

/* WADO-RS: one instance as the DICOM Part 10 bytes the PACS holds
 * (Accept: multipart/related; type="application/dicom", transfer syntax as
 * stored), or rendered=1: .../rendered as image/png (what a viewer shows).
 * *data malloc'd, caller frees. */
int mm_dweb_retrieve(mm_dweb *d, const char *study, const char *series, const char *sop,
                     int rendered, uint8_t **data, size_t *len, char *err, size_t errlen);

/* STOW-RS: POST one Part 10 file to {dicomweb}/studies/{study}. MM_OK when the
 * PACS reports it stored (or already held: the same SOP Instance UID). */
int mm_dweb_store(mm_dweb *d, const char *study, const uint8_t *dcm, size_t len, char *err,
                  size_t errlen);

/* The first value of a DICOM JSON attribute ("0020000D") as a string: strings
 * as they are, PN's Alphabetic group, numbers formatted; NULL when absent. The
 * pointer lives as long as obj (numbers: in buf). */
const char *mm_dweb_attr(json_t *obj, const char *tag, char *buf, size_t buflen);

#endif
