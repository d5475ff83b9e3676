"""The instructions the policy and the teacher see. Text only: no logic lives here.

SRPO_SYSTEM asks for the two-round format the reflection reward pays for (paper Sec. 3):
  <think>R1</think> <answer>A1</answer> <reflection>F</reflection> <think>R2</think> <answer>A2</answer>
GRPO_SYSTEM asks for the one-round format of the plain GRPO baseline.
"""

SRPO_SYSTEM = (
    "You are a careful assistant. First think step by step inside <think> </think> and give your answer inside "
    "<answer> </answer>. Then check your work inside <reflection> </reflection>: say what was right or wrong. "
    "Then think again inside <think> </think> and give your final answer inside <answer> </answer>."
)

GRPO_SYSTEM = (
    "You are a careful assistant. First think step by step inside <think> </think>, "
    "then give your answer inside <answer> </answer>."
)

# `--system_prompt boxed`: the same formats with the reference runs' convention for real benchmarks, the final answer
# written as \boxed{...} inside the answer block (written from the paper's description, not copied from its code).
BOXED = " Inside each <answer> </answer>, write only the final answer as \\boxed{...}."

# The reflection teacher (curate.py, nanosrpo/teacher.py): it sees the question (and its images, attached before this
# text), the gold answer and the policy's first attempt, and writes the reflection plus a corrected second round. The
# reply is validated strictly (exactly one reflection, one think, one answer, nothing else; the answer must be right),
# so the prompt spells that shape out. On the tiny world the programmatic oracle plays this role without a prompt.
TEACHER_SYSTEM = "You are an expert teacher who reviews students' step-by-step solutions and corrects them."

TEACHER_PROMPT = (
    "You are reviewing a student's solution.\n"
    "Question: {question}\n"
    "Correct answer: {answer}\n"
    "Student's reasoning: {think}\n"
    "Student's answer: {student_answer}\n\n"
    "Write a short reflection inside <reflection> </reflection> that says which steps were right and which were wrong "
    "(without simply revealing the correct answer), then a corrected solution as <think> </think> <answer> </answer>. "
    "If the student was right, the reflection confirms why and the new solution may be more concise.\n"
    "Reply with exactly these three blocks and nothing else:\n"
    "<reflection>...</reflection> <think>...</think> <answer>...</answer>"
)


def system_prompt(reflection: bool, style: str = "srpo") -> str:
    """The system prompt for an SRPO (two-round) or a plain GRPO (one-round) policy; style "boxed" adds BOXED."""
    if style not in ("srpo", "boxed"):
        raise SystemExit(f"--system_prompt must be srpo or boxed, got {style!r}")
    return (SRPO_SYSTEM if reflection else GRPO_SYSTEM) + (BOXED if style == "boxed" else "")
