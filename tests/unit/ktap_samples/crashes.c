/* Dies after its first of three results: its own TAP stops mid-stream. */
#include <stdlib.h>
#include "kselftest.h"
int main(void)
{
	ksft_print_header();
	ksft_set_plan(3);
	ksft_test_result_pass("before the crash\n");
	fflush(stdout);
	abort();
}
